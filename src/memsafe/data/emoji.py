"""Real captioned colour images: the open emoji art sets on the npm registry, prepared once into a diffusers
ImageFolder (PNG + metadata.jsonl), in the spirit of edm's dataset_tool.py. Fetching happens here only, never
inside train / evaluate: `npm pack` into a cache, then every later preparation reads the cached tarball."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from memsafe.errors import MemsafeError
from memsafe.progress import progress_bar

SIZES = (32, 64)
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}


@dataclass(frozen=True)
class EmojiSet:
    name: str
    package: str
    art: str
    licence: str
    attribution: str


SETS = {
    "google": EmojiSet("google", "emoji-datasource-google", "Noto Emoji", "Apache-2.0",
                       "Noto Emoji art by Google, Apache License 2.0 (https://github.com/googlefonts/noto-emoji)"),
    "twitter": EmojiSet("twitter", "emoji-datasource-twitter", "Twemoji", "CC-BY-4.0",
                        "Twemoji art by Twitter, Inc. and other contributors, CC-BY 4.0 "
                        "(https://github.com/jdecked/twemoji)"),
}


def parse_sets(text: str) -> list[EmojiSet]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETS]
    if unknown or not names:
        raise MemsafeError(f"unknown emoji set {', '.join(unknown) or repr(text)} (have: {', '.join(SETS)})")
    return [SETS[n] for n in dict.fromkeys(names)]


def npm_cache() -> Path:
    from memsafe.metrics.features import cache_dir

    return cache_dir() / "npm"


def fetch_package(package: str, cache: Path) -> Path:
    """The package's tarball, fetched with `npm pack` the first time and read from `cache` after."""
    cached = sorted(cache.glob(f"{package}-*.tgz"))
    if cached:
        return cached[-1]
    if shutil.which("npm") is None:
        raise MemsafeError(f"npm not found: preparing the emoji data fetches {package} with `npm pack` "
                           f"(install Node.js/npm, or put {package}-VERSION.tgz into {cache})")
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".{package}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        done = subprocess.run(["npm", "pack", package, "--silent", "--pack-destination", str(partial)],
                              capture_output=True, text=True, timeout=600)
        tarballs = list(partial.glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise MemsafeError(f"npm pack {package} failed: {lines[-1] if lines else f'exit {done.returncode}'}")
        target = cache / tarballs[0].name
        os.replace(tarballs[0], target)
        return target
    except subprocess.TimeoutExpired as exc:
        raise MemsafeError(f"npm pack {package} timed out after {exc.timeout:.0f} s") from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def caption(name: str, style: str, tones: str | None = None) -> str:
    """'a smiling cat face emoji, twitter style'; skin tones, when the image has them, after the name."""
    article = "an" if name[:1] in "aeiou" else "a"
    toned = f" with {tones} skin tone" if tones else ""
    return f"{article} {name}{toned} emoji, {style} style"


def skin_tones(code: str) -> str:
    parts = [SKIN_TONES[p] for p in code.split("-") if p in SKIN_TONES]
    return " and ".join(dict.fromkeys(parts))


def entries(catalogue: list[dict], emoji_set: EmojiSet) -> list[dict]:
    """One record per image the set has: the base emoji and each of its skin-tone variations."""
    flag = f"has_img_{emoji_set.name}"
    records = []
    for item in sorted(catalogue, key=lambda e: e.get("sort_order", 0)):
        name = (item.get("name") or item.get("short_name") or "").lower()
        base = {"set": emoji_set.name, "category": item.get("category", ""),
                "subcategory": item.get("subcategory", ""), "name": name}
        if item.get(flag):
            records.append(base | {"image": item["image"], "text": caption(name, emoji_set.name)})
        for code, variation in sorted((item.get("skin_variations") or {}).items()):
            if variation.get(flag):
                tones = skin_tones(code)
                records.append(base | {"image": variation["image"], "text": caption(name, emoji_set.name, tones),
                                       "name": f"{name} ({tones} skin tone)"})
    return records


def on_white(png: bytes, size: int) -> Image.Image:
    """Transparency composited on white, then down to `size` with a box filter (the art is 64 px)."""
    with Image.open(io.BytesIO(png)) as image:
        rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    return rgb if rgb.size == (size, size) else rgb.resize((size, size), Image.BOX)


def read_set(tarball: Path, emoji_set: EmojiSet) -> tuple[list[dict], dict[str, bytes]]:
    """(records, image bytes by file name) of one set's tarball."""
    prefix = f"package/img/{emoji_set.name}/64/"
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            catalogue = json.load(archive.extractfile("package/emoji.json"))
            images = {m.name[len(prefix):]: archive.extractfile(m).read()
                      for m in archive.getmembers() if m.isfile() and m.name.startswith(prefix)}
    except (tarfile.TarError, KeyError, OSError, json.JSONDecodeError, EOFError) as exc:
        raise MemsafeError(f"cannot read {tarball} (delete it to fetch again): {exc}") from exc
    return [r for r in entries(catalogue, emoji_set) if r["image"] in images], images


def prepare_emoji(out: str | Path, sets: str = "google,twitter", size: int = 32, cache: Path | None = None,
                  progress: bool = True) -> Path:
    """Writes OUT/<set>/<image>.png, OUT/metadata.jsonl (file_name, text, set, category, subcategory, name),
    OUT/LICENSES.md and OUT/README.md; OUT appears only once complete."""
    out = Path(out)
    chosen = parse_sets(sets)
    if size not in SIZES:
        raise MemsafeError(f"--size must be one of {', '.join(map(str, SIZES))}, got {size}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MemsafeError(f"output folder {out} already exists and is not empty")
    cache = cache or npm_cache()
    tarballs = {s.name: fetch_package(s.package, cache) for s in chosen}
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        lines = []
        for emoji_set in chosen:
            records, images = read_set(tarballs[emoji_set.name], emoji_set)
            (partial / emoji_set.name).mkdir(parents=True)
            bar = progress_bar(records, desc=f"emoji {emoji_set.name} {size}px", disable=not progress)
            with bar:
                for record in bar:
                    file_name = f"{emoji_set.name}/{record.pop('image')}"
                    on_white(images[Path(file_name).name], size).save(partial / file_name, optimize=True)
                    lines.append(json.dumps({"file_name": file_name} | record))
        (partial / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        write_notices(partial, chosen, tarballs, size, len(lines))
        if out.exists():
            out.rmdir()
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def write_notices(folder: Path, chosen: list[EmojiSet], tarballs: dict[str, Path], size: int, count: int) -> None:
    credits = "\n".join(f"- `{s.name}/`: {s.attribution}; from the npm package `{tarballs[s.name].stem}`."
                        for s in chosen)
    (folder / "LICENSES.md").write_text(
        "# Licences and attribution\n\n" + credits + "\n\nThe images were composited on white and resized to "
        f"{size}x{size} px by `memsafe data emoji`; captions are derived from the Unicode names in each package's "
        "emoji.json (emoji-datasource by Cal Henderson and contributors, MIT).\n")
    (folder / "README.md").write_text(
        f"# Emoji images, {size} px\n\n{count} captioned colour images in the diffusers ImageFolder layout "
        "(`metadata.jsonl`: file_name, text, set, category, subcategory, name), prepared by `memsafe data emoji`.\n\n"
        + credits + "\n\nSee LICENSES.md.\n")
