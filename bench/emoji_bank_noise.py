"""How much AGC's running bank sways with which images were drawn last, on a frozen emoji run (kept by
`bench/emoji.py --workdir DIR`): every distinct training emoji read at `--draws` noise draws (t in [200, 500)),
then a stream of training-like draws (each image as often as training draws it, batches of 32, seeded) fed
through memsafe's own `LossBank` and rule at lambda 1.02, for the bank the reference keeps (one per timestep,
decay 0.8: about nine recent draws) and a pooled one (20 bins, decay 0.98). The model is frozen, so only the
bank's noise differs between them. Shares of duplicate and unique draws skipped, after a quarter of the
stream as burn-in.

    python bench/emoji_bank_noise.py DIR/runs/iet_agc_plus-0 [...] [--draws 8] [--stream 40000] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from emoji_signal_auc import caption_draws  # noqa: E402
from results_io import RESULTS, write_results  # noqa: E402

from memsafe.defenses.iet_agc.agc import LOSS_BANK_BINS, LOSS_WEIGHT, LossBank  # noqa: E402

RATIO = 1.02
BANKS = {"per timestep, decay 0.8": (None, 0.8), "20 bins, decay 0.98": (20, 0.98)}


def streamed_skips(gain, loss, t, dup, picks, bins, decay, combined) -> dict:
    bank = LossBank(1000, decay, start_at_first=True, bins=bins)
    loss_bank = LossBank(1000, decay, start_at_first=True, geometric=True, bins=min(LOSS_BANK_BINS, len(bank.values)))
    image, draw = picks
    skipped = torch.zeros(len(image), dtype=torch.bool)
    for start in range(0, len(image), 32):
        rows = slice(start, start + 32)
        where = (draw[rows], image[rows])
        relative = bank.relative(gain[where], t[where])
        if combined:
            relative = relative * loss_bank.relative(loss[where], t[where]) ** LOSS_WEIGHT
            loss_bank.update(loss[where], t[where])
        bank.update(gain[where], t[where])
        skipped[rows] = relative * RATIO < 1.0
    burn = len(image) // 4
    skipped, is_dup = skipped[burn:], dup[image[burn:]]
    return {"dup": skipped[is_dup].double().mean().item(), "unique": skipped[~is_dup].double().mean().item()}


def bank_noise(run_dir: Path, draws: int, stream: int) -> dict:
    logs, copies, dup = caption_draws(run_dir, draws)
    copies = copies.double()
    generator = torch.Generator().manual_seed(1)
    image = torch.multinomial(copies / copies.sum(), stream, replacement=True, generator=generator)
    draw = torch.randint(0, draws, (stream,), generator=generator)
    gain, loss = (logs["own"] - logs["empty"]).exp(), logs["own"].exp()
    return {f"{signal} / {name}": streamed_skips(gain, loss, logs["t"], dup, (image, draw), bins, decay,
                                                 signal == "caption_gain_loss")
            for signal in ("caption_gain", "caption_gain_loss") for name, (bins, decay) in BANKS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--stream", type=int, default=40000)
    parser.add_argument("--out", type=Path, default=RESULTS / "emoji_bank_noise.json")
    args = parser.parse_args()
    results = {str(run): bank_noise(run, args.draws, args.stream) for run in args.runs}
    table = ["| run | rule / bank | dup. draws skipped | unique |", "|---|---|---|---|"]
    table += [f"| {run} | {rule} | {r['dup']:.3f} | {r['unique']:.3f} |"
              for run, rules in results.items() for rule, r in rules.items()]
    write_results(args.out, {"draws": args.draws, "stream": args.stream, "ratio": RATIO, "runs": results}, table)


if __name__ == "__main__":
    main()
