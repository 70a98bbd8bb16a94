"""The `memsafe` command: train, evaluate, generate, demo, data."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

import yaml

from memsafe.errors import MemsafeError
from memsafe.progress import close_all_bars


def _overrides(pairs: list[str]) -> dict:
    values = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise MemsafeError(f"--set takes key=value, got {pair!r}")
        values[key.strip()] = yaml.safe_load(raw)
    return values


def _config(path: str | None, overrides: dict):
    from memsafe.config import RunConfig, load_config, merge

    config = load_config(path) if path else RunConfig()
    return merge(config, overrides) if overrides else config


def demo_config_path(defense: str = "none") -> Path:
    """The packaged demo config a defense names (the unconditional digits demo by default)."""
    from memsafe.defenses import selected

    names = [n for n in defense.split("+") if n.strip() and n.strip() != "none"]
    configs = {d.demo_config for d in selected(names)} - {"demo.yaml"}
    return Path(str(resources.files("memsafe") / "configs" / (configs.pop() if configs else "demo.yaml")))


def cmd_train(args) -> None:
    from memsafe.runs import train_run

    overrides = _overrides(args.set)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    run_dir = train_run(_config(args.config, overrides), progress=not args.no_progress)
    print(f"trained: {run_dir}")


def print_reading(metrics: dict) -> None:
    """Memorization and quality in one line, then the quality warning and concept readings when there are any."""
    from memsafe.report.table import reading

    print(reading(metrics))
    if "quality_warning" in metrics:
        print(f"WARNING: {metrics['quality_warning']}")
    if "extraction_rate" in metrics:
        print(
            f"extraction attack: {metrics['extraction_rate']:.1%} of generations prompted for the concept show it; "
            f"{metrics['base_rate']:.1%} of those for prompts naming none do (base rate); "
            f"{metrics['allowed_accuracy']:.1%} of allowed prompts get the digit and ink they ask for."
        )


def cmd_evaluate(args) -> None:
    from memsafe.report.table import metrics_table
    from memsafe.runs import evaluate_run

    run_dir = Path(args.run_dir)
    evaluation = evaluate_run(run_dir, progress=not args.no_progress)
    print(metrics_table({run_dir.name: evaluation.metrics}))
    print_reading(evaluation.metrics)
    print(f"wrote {run_dir / 'report.md'} (and report.html, metrics.json, samples/, samples.npz, figures)")


def cmd_generate(args) -> None:
    from memsafe.report.figures import save_image_grid
    from memsafe.runs import sample_run, write_samples

    run_dir = Path(args.run_dir)
    samples, prompts = sample_run(run_dir, args.num, args.seed, prompts=args.prompt, progress=not args.no_progress,
                                  guidance_scale=args.guidance_scale)
    out = Path(args.out) if args.out else run_dir / "generated"
    archive = write_samples(samples, out, args.seed, prompts)
    grid = out.with_name(f"{out.name}-grid.png")
    save_image_grid(samples[:64], grid)
    print(f"wrote {len(samples)} images to {out}, with {archive.name} and {grid.name} beside it")


def cmd_demo(args) -> None:
    from memsafe.report.figures import save_side_by_side
    from memsafe.report.table import COMPARISON, metrics_table
    from memsafe.runs import evaluate_run, read_status, train_run

    names = ["none"] + [args.defense] * (args.defense != "none")
    parent = Path(args.output_dir or "runs/demo")
    path = str(demo_config_path(args.defense))
    configs = {name: _config(path, _overrides(args.set) | {"defense.name": name, "output_dir": str(parent / name)})
               for name in names}  # every config is checked before the first run starts
    first = configs["none"]
    kind = "text-conditional DDPM" if first.model.conditioning == "text" else "DDPM"
    print(f"memsafe demo: {kind} on {first.data.max_train_images or 'all'} real handwritten digits "
          f"({first.data.resolution}x{first.data.resolution}), {first.train.max_steps} steps each, "
          f"{' and '.join(names)} on the same data")
    results = {}
    for name, config in configs.items():
        print(f"\n[{name}]")
        run_dir = train_run(config, progress=not args.no_progress)
        results[name] = evaluate_run(run_dir, progress=not args.no_progress).metrics | {
            "train_seconds": read_status(run_dir)["train_seconds"]}
    print()
    print(metrics_table(results, COMPARISON))
    print()
    for name, metrics in results.items():
        print(f"{name}: ", end="")
        print_reading(metrics)
    save_side_by_side({name: parent / name / "nearest.png" for name in names}, parent / "nearest.png")
    print(f"see {parent / 'nearest.png'} (generations above their nearest training images, side by side) "
          f"and each run's report.html")


def cmd_data_emoji(args) -> None:
    from memsafe.data.emoji import prepare_emoji

    out = prepare_emoji(args.out, args.sets, args.size, progress=not args.no_progress)
    print(f"wrote {out} ({sum(1 for _ in open(out / 'metadata.jsonl'))} captioned images; licences in LICENSES.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memsafe", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    def common(p):
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
        return p

    p = common(sub.add_parser("train", help="train (or resume) a run from a YAML config"))
    p.add_argument("--config", help="YAML run config (defaults for every key left out)")
    p.add_argument("--output-dir", help="run directory (overrides output_dir)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.max_steps=200")
    p.set_defaults(func=cmd_train)

    p = common(sub.add_parser("evaluate", help="generate from a run and measure memorization and quality"))
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_evaluate)

    p = common(sub.add_parser("generate", help="write PNG samples from a trained run"))
    p.add_argument("run_dir")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for the images (default: RUN_DIR/generated)")
    p.add_argument("--prompt", action="append", help="prompt for a text run (repeat for several; cycled over --num)")
    p.add_argument("--guidance-scale", type=float,
                   help="classifier-free guidance of a text run (default: the run's eval.guidance_scale; 1: none)")
    p.set_defaults(func=cmd_generate)

    p = common(sub.add_parser("demo", help="train the built-in digits with and without a defense, then measure both"))
    p.add_argument("--defense", default="iet_agc", help="defense to compare with no defense (default: iet_agc)")
    p.add_argument("--output-dir", help="parent folder of the runs (default: runs/demo)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a demo config key")
    p.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="prepare a data set into an image folder (the only command that downloads)")
    kinds = data.add_subparsers(dest="kind", required=True)
    p = common(kinds.add_parser("emoji", help="the open emoji art sets on npm, captioned from their Unicode names"))
    p.add_argument("out", help="folder to write (must not exist or be empty)")
    p.add_argument("--sets", default="google,twitter", help="comma-separated: google (Noto, Apache-2.0), "
                                                           "twitter (Twemoji, CC-BY 4.0)")
    p.add_argument("--size", type=int, default=32, help="32 or 64 px")
    p.set_defaults(func=cmd_data_emoji)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from memsafe import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        args.func(args)
    except MemsafeError as exc:
        close_all_bars()
        print(f"memsafe: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        close_all_bars()
        print("memsafe: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
