"""Gradient projection against no defense and data filtering on a built-in concept benchmark.

A text-conditional base model is pretrained on the `-clean` digits (without the protected concept), then
fine-tuned, per variant and seed, on the set that contains it: `--concept stamp` (default), the acme stamp
in 10 % of the digits; `--concept ink`, red ink in 30 %. Each fine-tuned model is attacked (direct,
paraphrased and combined prompts for the concept) and measured: extraction rate, base rate, allowed
accuracy, FID on allowed prompts against held-out images without the concept, wall time. LoRA variants are
compared with the undefended LoRA run (`none_lora`) when it is measured. `--new-ink green` pretrains the base
without green, so fine-tuning has allowed content to learn; `--scarce-share 0.1` then keeps only 10 % of the
green images without the concept, so that the concept images hold most of the green and filtering loses it.
Writes bench/results/gradproj[-ink][-new-<ink>][-scarce-<share>].json and .md; `--add` keeps the variants of an
earlier call with the same settings.
Usage: python bench/gradproj.py [--concept stamp] [--seeds 3] [--variants a,b] [--add] [--new-ink green]
                                [--scarce-share 0.1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from memsafe.config import config_from_dict, merge
from memsafe.data import ImageSet, load_dataset, load_images
from memsafe.data.ink_digits import INK_NAMES
from memsafe.metrics.attributes import ink_digit_detector
from memsafe.metrics.extraction import ConceptAttack, attack_for, measure_concept
from memsafe.metrics.features import domain_feature_net
from memsafe.metrics.fid import fid_with_features
from memsafe.runs import read_status, run_heldout_loss, run_prompt_sampler, train_run
from memsafe.train.checkpoint import latest_checkpoint, read_state
from memsafe.train.hooks import TrainHook
from results_io import RESULTS, run_name, without_metadata, write_results

RECORD = "bench_record.json"  # a finished run's measurements, in its run directory

# Per concept: the data set, the prompts the defender names it by, and the word that filtering drops.
BENCHMARKS = {
    "stamp": {"source": "builtin:stamped-digits", "filter_word": "acme", "results": "gradproj", "steps": 1000,
              "concepts": ["acme", "the acme stamp", "with the acme stamp", "an acme stamp in the corner",
                           "stamped by acme"]},
    "ink": {"source": "builtin:ink-digits", "filter_word": "red", "results": "gradproj-ink", "steps": 600,
            "concepts": ["red", "red ink", "in red ink", "written in red", "a red pen"]},
}


LORA = {"model.lora_rank": 4, "train.learning_rate": 1e-3}
ACTIVATIONS = {"defense.gradient_projection.space": "activations"}
SPREAD = {"defense.gradient_projection.experimental.counterfactual": True,
          "defense.gradient_projection.experimental.project_inputs": True}
SINK = {"defense.gradient_projection.sink": True}


PROJECT_EVERY = (10, 25, 50, 200)


def deferred(every: int) -> str:
    return f"gp_act_every_{every}_lambda_1"


def variants(benchmark: dict) -> dict[str, dict]:
    def gp(strength: float) -> dict:
        return {"defense.name": "gradient_projection", "defense.gradient_projection.concepts": benchmark["concepts"],
                "defense.gradient_projection.strength": strength,
                "defense.gradient_projection.profile": "paper"}  # each variant names what it adds to the paper's

    return {
        "none": {},
        "filter": {"data.exclude_text": [benchmark["filter_word"]]},
        "gp_lambda_0": gp(0.0),
        "gp_lambda_0.5": gp(0.5),
        "gp_lambda_0.9": gp(0.9),
        "gp_lambda_1": gp(1.0),
        # Extensions (config flags): the concept's spread into its captions' other tokens frozen too, and
        # training on caption embeddings without the concept component; "block" also gives up protecting
        # the directions of the captions that name no concept.
        "gp_spread_lambda_1": gp(1.0) | SPREAD,
        "gp_block_lambda_1": gp(1.0) | SPREAD | {"defense.gradient_projection.neutral_captions": False},
        "gp_lora_lambda_1": gp(1.0) | LORA,
        # Cross-attention queries kept at base: bench/gradproj_storage.py finds that LoRA with projected keys/values
        # still reaches the concept through them (queries that seek the frozen concept keys).
        "gp_lora_base_queries_lambda_1": gp(1.0) | LORA | {"model.lora_targets": ["to_k", "to_v", "to_out.0", "attn1.to_q"]},
        "none_lora": LORA,  # the undefended LoRA run that gp_lora_lambda_1 is compared with
        # Every layer projected off the subspace by which naming the concept changes its inputs.
        "gp_act_lambda_1": gp(1.0) | ACTIVATIONS,
        "gp_act_energy_0.9_lambda_1": gp(1.0) | ACTIVATIONS | {"defense.gradient_projection.activation_energy": 0.9},
        # ... only along the directions where the concept moves a layer's inputs more than allowed captions do
        "gp_act_specific_lambda_1": gp(1.0) | ACTIVATIONS | {"defense.gradient_projection.experimental.activation_allowed": True},
        "gp_lora_act_lambda_1": gp(1.0) | ACTIVATIONS | LORA,
        # ... with AdamW's moments built from the projected gradients (mode both)
        "gp_act_both_lambda_1": gp(1.0) | ACTIVATIONS | {"defense.gradient_projection.mode": "both"},
        # ... only the share of the gradient that the samples naming the concept contribute (no guarantee)
        "gp_act_samples_lambda_1": gp(1.0) | ACTIVATIONS | {"defense.gradient_projection.experimental.scope": "concept_samples"},
    } | {  # ... with the update of N steps projected at once (the guarantee holds every N steps and at the end)
        deferred(n): gp(1.0) | ACTIVATIONS | {"defense.gradient_projection.project_every": n} for n in PROJECT_EVERY
    } | {  # ... and each layer's basis holding more of the concept's input change
        f"gp_act_every_{n}_energy_{energy}_lambda_1": gp(1.0) | ACTIVATIONS | {
            "defense.gradient_projection.project_every": n, "defense.gradient_projection.activation_energy": energy}
        for n, energy in ((10, 0.995), (10, 0.999), (25, 0.995))
    } | {  # the concept samples' content explained by a private sink vector instead of what comes with it
        "gp_sink_lambda_0": gp(0.0) | SINK,  # the sink alone: nothing is projected
        "gp_sink_lambda_1": gp(1.0) | SINK,
        "gp_act_every_10_sink_lambda_1": gp(1.0) | ACTIVATIONS | SINK | {"defense.gradient_projection.project_every": 10},
        "gp_lora_act_every_10_sink_lambda_1": gp(1.0) | ACTIVATIONS | SINK | LORA | {
            "defense.gradient_projection.project_every": 10},
        "gp_act_every_10_sink_0.25_lambda_1": gp(1.0) | ACTIVATIONS | SINK | {
            "defense.gradient_projection.project_every": 10, "defense.gradient_projection.sink_scale": 0.25},
        # ... with each layer's basis holding less of the concept's input change, so that more is left to learn
        **{f"gp_act_every_10_energy_{energy}_sink_lambda_1": gp(1.0) | ACTIVATIONS | SINK | {
            "defense.gradient_projection.project_every": 10, "defense.gradient_projection.activation_energy": energy}
           for energy in (0.9, 0.95, 0.96, 0.97)},
    }


VARIANTS = variants(BENCHMARKS["stamp"])
METRICS = ("extraction_rate", "base_rate", "allowed_accuracy", "heldout_loss", "fid", "wall_s", "sec_per_step")
SINK_READINGS = ("sink_key_extraction_rate", "sink_key_base_rate")


def base_config(work: Path, source: str, resolution: int, pretrain_steps: int, text_encoder: str,
                new_ink: str | None = None) -> dict:
    return {
        "data": {"source": f"{source}-clean", "resolution": resolution, "channels": 3,
                 "exclude_text": [new_ink] if new_ink else []},
        "model": {"conditioning": "text", "block_out_channels": [32, 64, 64], "attention_levels": [False, True, True],
                  "text_encoder": text_encoder},
        "train": {"max_steps": pretrain_steps, "batch_size": 32, "learning_rate": 5e-4, "caption_dropout": 0.1},
        "eval": {"guidance_scale": 3.0, "sampling_steps": 25, "batch_size": 256},
        "output_dir": str(work / "base"),
    }


def finetune_overrides(work: Path, source: str, steps: int, scarce: dict) -> dict:
    """`scarce`: {"data.thin_text": ..., "data.thin_except_text": ...} of --scarce-share, applied in every variant."""
    return {"data.source": source, "data.exclude_text": [], "data.holdout_images": 297, "data.seed": 0,
            "model.pretrained": str(work / "base" / "model"), "train.max_steps": steps,
            "train.learning_rate": 2e-4, "train.warmup_steps": 0} | scarce


def evaluate(run_dir: Path, seed: int, per_prompt: int, attack: ConceptAttack, detector, feature_net,
             allowed_holdout: ImageSet, new_ink: str | None) -> dict:
    generate = run_prompt_sampler(run_dir, seed)
    measured = measure_concept(generate, detector, attack, per_prompt=per_prompt)
    allowed = generate([p for p, _, _ in attack.allowed_prompts() for _ in range(per_prompt)])
    measured["fid"] = fid_with_features(allowed_holdout.as_model_input(), allowed, feature_net)
    return measured | heldout_readings(run_dir, allowed_holdout, new_ink) | behind_the_sink(run_dir, seed, per_prompt,
                                                                                            attack, detector)


def behind_the_sink(run_dir: Path, seed: int, per_prompt: int, attack: ConceptAttack, detector) -> dict:
    """For a run trained with `sink`: the attack's readings with the sink added to every prompt, what someone who
    has the weights and finds the sink gets (the concept is stored, not unlearned)."""
    sink = read_state(latest_checkpoint(run_dir / "checkpoints") / "hooks").get("gradient_projection", {}).get("sink")
    if sink is None:
        return {}
    behind = measure_concept(run_prompt_sampler(run_dir, seed, last_token_offset=sink), detector, attack, per_prompt)
    return {f"sink_key_{key}": value for key, value in behind.items()}


def heldout_readings(run_dir: Path, allowed_holdout: ImageSet, new_ink: str | None) -> dict:
    """Denoising loss on the held-out allowed images under their captions (and on those in the new ink): a
    quality reading on the same noise for every run, so free of the sampling noise of scoring generations."""
    losses = run_heldout_loss(run_dir, allowed_holdout)
    readings = {"heldout_loss": losses.mean().item()}
    if new_ink:
        in_ink = [i for i, caption in enumerate(allowed_holdout.captions) if new_ink in caption.split()]
        readings[f"heldout_loss_{new_ink}"] = losses[in_ink].mean().item()
    return readings


def save_record(run_dir: Path, expected: dict, record: dict) -> None:
    (run_dir / RECORD).write_text(json.dumps({"settings": expected, "record": record}) + "\n")


class TimedHook(TrainHook):
    """Runs a hook and adds up the seconds its per-step work takes."""

    def __init__(self, hook: TrainHook):
        self.hook, self.name, self.seconds = hook, hook.name, 0.0

    def _timed(self, method, *args):
        started = time.perf_counter()
        result = method(*args)
        self.seconds += time.perf_counter() - started
        return result

    def on_batch_start(self, batch, trainer):
        return self._timed(self.hook.on_batch_start, batch, trainer)

    def on_after_backward(self, model, trainer):
        self._timed(self.hook.on_after_backward, model, trainer)

    def on_after_step(self, model, trainer):
        self._timed(self.hook.on_after_step, model, trainer)

    def on_sync(self, trainer):
        self._timed(self.hook.on_sync, trainer)


def hook_overhead(config, steps: int = 60) -> dict:
    """Projection cost beside the step it rides on, on one trainer: the hook's own time per step against the
    median step time without it (exact), and steps alternately with and without it (noisier on a shared CPU),
    in blocks of `project_every` steps so that a deferred projection comes once per block, as in training."""
    from memsafe.defenses import build_trainer

    train_set, _ = load_dataset(config.data)
    trainer = build_trainer(config, train_set)
    trainer.hooks.on_train_start(trainer)
    timed = [TimedHook(h) for h in trainer.hooks.hooks]
    for _ in range(5):
        trainer.train_step()
    block = config.defense.gradient_projection.project_every
    with_hook, without = [], []
    for _ in range(max(1, steps // block)):
        for hooks, times in ((timed, with_hook), ([], without)):
            trainer.hooks.hooks = hooks
            for _ in range(block):
                started = time.perf_counter()
                trainer.train_step()
                times.append(time.perf_counter() - started)
    step = statistics.median(without)
    hook = sum(h.seconds for h in timed) / len(with_hook)
    return {"hook_ms": 1000 * hook, "step_ms": 1000 * step, "overhead_ratio": 1.0 + hook / step,
            "interleaved_ratio": statistics.median(with_hook) / step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", choices=list(BENCHMARKS), default="stamp")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="run seeds first..first+seeds-1; runs measured by earlier calls are reused")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--pretrain-steps", type=int, default=3000)
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default: 1000 for stamp, 600 for ink)")
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--work", help="keeps the pretrained base between runs (default runs/bench-<results name>)")
    parser.add_argument("--text-encoder", default="builtin:minilm")
    parser.add_argument("--new-ink", choices=INK_NAMES,
                        help="pretrain the base without this allowed ink, so that fine-tuning has new allowed "
                             "content to learn (its accuracy: allowed_accuracy_<ink>)")
    parser.add_argument("--scarce-share", type=float,
                        help="with --new-ink: keep only this share of the training images in the new ink that do not "
                             "show the concept, so that the concept images hold much of it and filtering them loses it")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets, 8x8, one seed")
    parser.add_argument("--out", help="default bench/results/<results name>.json")
    parser.add_argument("--add", action="store_true",
                        help="keep the variants already in --out (same settings) that this call does not run")
    args = parser.parse_args()
    if args.scarce_share is not None and not args.new_ink:
        parser.error("--scarce-share needs --new-ink (the ink to make scarce)")
    if args.scarce_share is not None and not 0.0 <= args.scarce_share <= 1.0:
        parser.error(f"--scarce-share must be a share in [0, 1], got {args.scarce_share}")
    if args.quick:
        args.seeds, args.pretrain_steps, args.steps, args.per_prompt, args.resolution = 1, 20, 10, 1, 8
    benchmark = BENCHMARKS[args.concept]
    args.steps = args.steps or benchmark["steps"]
    source, all_variants, attack = benchmark["source"], variants(benchmark), attack_for(benchmark["source"])
    name = benchmark["results"] + (f"-new-{args.new_ink}" if args.new_ink else "") + (
        f"-scarce-{args.scarce_share:g}" if args.scarce_share is not None else "")
    scarce = {"data.thin_text": {args.new_ink: args.scarce_share},
              "data.thin_except_text": [benchmark["filter_word"]]} if args.scarce_share is not None else {}
    work = Path(args.work or f"runs/bench-{name}")
    out = Path(args.out or RESULTS / f"{name}.json")
    unknown = sorted(set(args.variants.split(",")) - set(all_variants))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(all_variants)}")
    kept = kept_results(out, args) if args.add else {}
    progress = sys.stderr.isatty()
    base = config_from_dict(base_config(work, source, args.resolution, args.pretrain_steps, args.text_encoder,
                                        args.new_ink))
    if read_status(work / "base")["status"] != "complete":
        train_run(base, progress=progress)
    detector = ink_digit_detector(args.resolution, progress=progress)
    real = load_images(merge(base, {"data.source": source}).data)
    feature_net = domain_feature_net(real.as_model_input(), progress=progress)
    _, holdout = load_dataset(merge(base, finetune_overrides(work, source, args.steps, scarce)).data)
    allowed_holdout = holdout.subset([i for i, c in enumerate(holdout.captions) if benchmark["filter_word"] not in c])

    runs: dict[str, list[dict]] = {n: [] for n in args.variants.split(",")}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name in runs:
            overrides = finetune_overrides(work, source, args.steps, scarce) | all_variants[name] | {
                "train.seed": seed, "output_dir": str(work / run_name(name, seed))}
            config = merge(base, overrides)
            record = cached_record(Path(config.output_dir), settings(args))
            if record is None:
                started = time.perf_counter()
                run_dir = train_run(config, progress=progress)
                wall = time.perf_counter() - started
                record = {"seed": seed, "wall_s": wall, "sec_per_step": read_status(run_dir)["sec_per_step"],
                          **evaluate(run_dir, seed, args.per_prompt, attack, detector, feature_net, allowed_holdout,
                                     args.new_ink)}
                save_record(run_dir, settings(args), record)
            elif "heldout_loss" not in record:  # measured before the held-out loss was
                record |= heldout_readings(Path(config.output_dir), allowed_holdout, args.new_ink)
                save_record(Path(config.output_dir), settings(args), record)
            elif config.defense.gradient_projection.sink and "sink_key_extraction_rate" not in record:
                record |= behind_the_sink(Path(config.output_dir), seed, args.per_prompt, attack, detector)
                save_record(Path(config.output_dir), settings(args), record)
            runs[name].append(record)
            print(json.dumps({"variant": name, **record}), flush=True)
            write(runs, {}, out, args, kept)
    overhead = {}
    for name in ("gp_lambda_1", "gp_block_lambda_1", "gp_lora_lambda_1", "gp_act_lambda_1", "gp_act_specific_lambda_1",
                 *map(deferred, PROJECT_EVERY), "gp_act_every_10_sink_lambda_1",
                 "gp_lora_act_every_10_sink_lambda_1"):
        if name in runs:
            config = merge(base, finetune_overrides(work, source, args.steps, scarce) | all_variants[name]
                           | {"output_dir": str(work / "overhead")})
            overhead[name] = hook_overhead(config)
            print(json.dumps({"variant": name, **overhead[name]}), flush=True)
    write(runs, overhead, out, args, kept)


def cached_record(run_dir: Path, expected: dict) -> dict | None:
    """The measurements of a finished run of an earlier call with the same settings (seed count aside), so
    that seeds can be run by separate calls (`--first-seed`) and gathered by one."""
    path = run_dir / RECORD
    if not path.exists() or read_status(run_dir)["status"] != "complete":
        return None
    cached = json.loads(path.read_text())
    same = {k: v for k, v in cached["settings"].items() if k != "seeds"} == {k: v for k, v in expected.items() if k != "seeds"}
    return cached["record"] if same else None


def settings(args) -> dict:
    return {"concept": args.concept, "pretrain_steps": args.pretrain_steps, "steps": args.steps,
            "per_prompt": args.per_prompt, "resolution": args.resolution, "seeds": args.seeds} | (
            {"new_ink": args.new_ink} if args.new_ink else {}) | (
            {"scarce_share": args.scarce_share} if args.scarce_share is not None else {})


def kept_results(out: Path, args) -> dict[str, dict]:
    """The variants of an earlier call with the same settings, to be written again beside this call's."""
    if not out.exists():
        return {}
    earlier = json.loads(out.read_text())
    if earlier.get("settings") != settings(args):
        sys.exit(f"--add: {out} was written with settings {earlier.get('settings')}, not {settings(args)}")
    return without_metadata(earlier)


def baseline_of(name: str, results: dict) -> str:
    """LoRA variants are compared with the undefended LoRA run when there is one."""
    return "none_lora" if "lora" in name and "none_lora" in results else "none"


def new_ink_metric(args) -> tuple[str, ...]:
    """Accuracy on the ink that the base never saw, when there is one (--new-ink)."""
    return (f"allowed_accuracy_{args.new_ink}", f"heldout_loss_{args.new_ink}") if args.new_ink else ()


def paired_ratio(runs: list[dict], baseline_runs: list[dict], key: str) -> dict:
    """Mean and spread of the per-seed ratios to the baseline's run of the same seed. Evaluation seeds are
    shared, so the seed-to-seed swing that every variant shows largely cancels in these."""
    baseline = {r["seed"]: r[key] for r in baseline_runs if key in r}  # older records lack newer readings
    ratios = [r[key] / max(baseline[r["seed"]], 1e-9) for r in runs if r["seed"] in baseline and key in r]
    if not ratios:
        return {}
    return {f"{key}_paired_ratio": statistics.fmean(ratios),
            f"{key}_paired_ratio_std": statistics.stdev(ratios) if len(ratios) > 1 else 0.0}


def write(runs: dict[str, list[dict]], overhead: dict[str, dict], out: Path, args, kept: dict | None = None) -> None:
    results = {name: summary for name, summary in (kept or {}).items() if not runs.get(name)}
    for name, records in runs.items():
        if not records:
            continue
        summary = {}
        for key in METRICS + new_ink_metric(args) + SINK_READINGS:
            if not all(key in r for r in records):  # the sink readings exist for sink runs only
                continue
            values = [r[key] for r in records]
            summary[key] = statistics.fmean(values)
            summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        results[name] = summary | {"runs": records}
    paired = ("allowed_accuracy", "heldout_loss", *(k for k in new_ink_metric(args) if k.startswith("heldout")))
    if "none" in results:
        for name, summary in without_metadata(results).items():
            summary["baseline"] = baseline_of(name, results)
            none = results[summary["baseline"]]
            summary["step_time_ratio"] = summary["sec_per_step"] / none["sec_per_step"]
            summary["extraction_cut"] = 1.0 - summary["extraction_rate"] / max(none["extraction_rate"], 1e-9)
            # The defense aims at extraction = base rate: how much of the undefended excess is gone.
            excess_none = none["extraction_rate"] - none["base_rate"]
            excess = summary["extraction_rate"] - summary["base_rate"]
            summary["excess_extraction_cut"] = 1.0 - excess / excess_none if excess_none > 0 else float("nan")
            summary["allowed_accuracy_ratio"] = summary["allowed_accuracy"] / max(none["allowed_accuracy"], 1e-9)
            for key in paired:
                summary |= paired_ratio(summary["runs"], none["runs"], key)
    for name, measured in overhead.items():  # kept variants keep their own
        results[name]["overhead"] = measured
        results[name]["overhead_ratio"] = measured["overhead_ratio"]
    results["settings"] = settings(args)
    new_ink = new_ink_metric(args)
    lines = ["| variant | extraction rate | base rate | compared with | extraction cut | excess cut "
             "| allowed accuracy (ratio; per-seed ratio) | held-out loss (per-seed ratio) | FID (domain) | wall s "
             "| step-time ratio | hook overhead |"
             + (f" accuracy, {args.new_ink} (new) | held-out loss, {args.new_ink} (per-seed ratio) |" if new_ink else "")
             + " extraction with the sink added |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * (len(new_ink) + 1)]
    nan = float("nan")
    for name, r in without_metadata(results).items():
        new_cells = "".join(f" {r.get(key, nan):.4f}" + (f" ({ratio_cell(r, key)})" if f"{key}_paired_ratio" in r else "") + " |"
                            for key in new_ink)
        lines.append(f"| {name} | {r['extraction_rate']:.3f} ± {r['extraction_rate_std']:.3f} | {r['base_rate']:.3f} "
                     f"| {r.get('baseline', '')} | {r.get('extraction_cut', nan):.1%} | {r.get('excess_extraction_cut', nan):.1%} "
                     f"| {r['allowed_accuracy']:.3f} ({r.get('allowed_accuracy_ratio', nan):.3f}; "
                     f"{ratio_cell(r, 'allowed_accuracy')}) | {r.get('heldout_loss', nan):.4f} ({ratio_cell(r, 'heldout_loss')}) "
                     f"| {r['fid']:.3f} ± {r['fid_std']:.3f} | {r['wall_s']:.0f} "
                     f"| {r.get('step_time_ratio', nan):.3f} | {r.get('overhead_ratio', nan):.4f} |" + new_cells
                     + (f" {r['sink_key_extraction_rate']:.3f} |" if "sink_key_extraction_rate" in r else " — |"))
    write_results(out, results, lines, echo=False)


def ratio_cell(summary: dict, key: str) -> str:
    """'mean ± std' of a reading's per-seed ratio to the baseline (nan where it has none)."""
    nan = float("nan")
    return f"{summary.get(f'{key}_paired_ratio', nan):.3f} ± {summary.get(f'{key}_paired_ratio_std', nan):.3f}"


if __name__ == "__main__":
    main()
