"""`memsafe data emoji`: a package tarball laid out like emoji-datasource-* (made here, so the test runs
offline) becomes a captioned ImageFolder that memsafe loads; bad input is one line and leaves nothing."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from memsafe.cli import main
from memsafe.data.image_folder import load_image_folder

CATALOGUE = [
    {"name": "SMILING CAT FACE WITH OPEN MOUTH", "image": "1f63a.png", "category": "Smileys & Emotion",
     "subcategory": "cat-face", "sort_order": 2, "has_img_twitter": True},
    {"name": "FATHER CHRISTMAS", "image": "1f385.png", "category": "People & Body", "subcategory": "person-fantasy",
     "sort_order": 1, "has_img_twitter": True,
     "skin_variations": {"1F3FF": {"image": "1f385-1f3ff.png", "has_img_twitter": True},
                         "1F3FB": {"image": "1f385-1f3fb.png", "has_img_twitter": False}}},
    {"name": "EGYPT FLAG", "image": "1f1ea-1f1ec.png", "category": "Flags", "subcategory": "country-flag",
     "sort_order": 3, "has_img_twitter": False},
]


def png(colour: tuple[int, int, int], transparent_half: bool) -> bytes:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = colour
    rgba[..., 3] = 255
    if transparent_half:
        rgba[:, :32, 3] = 0
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_package(cache, name: str = "emoji-datasource-twitter-16.0.0.tgz"):
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(cache / name, "w:gz") as archive:
        add(archive, "package/emoji.json", json.dumps(CATALOGUE).encode())
        add(archive, "package/img/twitter/64/1f63a.png", png((250, 200, 0), transparent_half=True))
        add(archive, "package/img/twitter/64/1f385.png", png((200, 0, 0), transparent_half=False))
        add(archive, "package/img/twitter/64/1f385-1f3ff.png", png((90, 50, 20), transparent_half=False))
    return cache / name


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSAFE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "npm"


@pytest.mark.parametrize("size", [32, 64])
def test_a_package_becomes_a_captioned_folder_memsafe_loads(tmp_path, cache, size):
    write_package(cache)
    out = tmp_path / "emoji"
    assert main(["data", "emoji", str(out), "--sets", "twitter", "--size", str(size), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == [
        "a father christmas emoji, twitter style",
        "a father christmas with dark skin tone emoji, twitter style",
        "a smiling cat face with open mouth emoji, twitter style",
    ]  # sorted as the catalogue orders them; the flag and the variation without art are left out
    assert {r["set"] for r in records} == {"twitter"} and records[2]["category"] == "Smileys & Emotion"
    assert "CC-BY 4.0" in (out / "LICENSES.md").read_text() and "CC-BY 4.0" in (out / "README.md").read_text()

    images = load_image_folder(out, size, 3)
    cat = images.pixels[images.names.index("twitter/1f63a.png")]
    assert images.captions[images.names.index("twitter/1f63a.png")] == records[2]["text"]
    assert cat.shape == (3, size, size)
    assert (cat[:, :, : size // 2] == 255).all(), "transparency is composited on white"
    assert cat[:, :, size // 2:].flatten(1).float().mean(1).tolist() == pytest.approx([250, 200, 0], abs=1)
    assert not list(tmp_path.glob(".*partial*"))


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, cache, capsys, monkeypatch):
    out = tmp_path / "emoji"
    assert main(["data", "emoji", str(out), "--sets", "twitter,apple", "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == "memsafe: error: unknown emoji set apple (have: google, twitter)"

    assert main(["data", "emoji", str(out), "--sets", "twitter", "--size", "48", "--no-progress"]) == 1
    assert "--size must be one of 32, 64" in capsys.readouterr().err

    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert main(["data", "emoji", str(out), "--sets", "twitter", "--no-progress"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("memsafe: error: npm not found") and "\n" not in error

    cache.mkdir(parents=True)
    (cache / "emoji-datasource-twitter-16.0.0.tgz").write_bytes(b"not a tarball")
    assert main(["data", "emoji", str(out), "--sets", "twitter", "--no-progress"]) == 1
    error = capsys.readouterr().err.strip()
    assert "cannot read" in error and "delete it to fetch again" in error and "\n" not in error
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))

    write_package(cache)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["data", "emoji", str(out), "--sets", "twitter", "--no-progress"]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
