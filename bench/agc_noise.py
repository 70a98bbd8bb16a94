"""Why does AGC skip ~40 % of visits on the glyphs of tests/test_iet_quality.py? Trains IET-AGC+ there (its
defaults, seed 0, or the JSON of defense.iet_agc overrides given) recording every visit's loss, then splits
the log loss of the second half of training into a timestep curve (20-step bins), a per-sample effect
(difficulty, or memorization) and a per-visit residual (the noise draw), and prints the spread of each
sample's skip fraction (docs/research/iet-agc.md).

    python bench/agc_noise.py WORKDIR ['{"agc_smoothing": 0}' [OUT.json]]   # default bench/results/agc_noise.json
"""
import json
import sys
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import RESULTS, write_json
from memsafe.data.glyphs import glyph_folder
from memsafe.config import config_from_dict
from memsafe.data import load_dataset
from memsafe.defenses.iet_agc.driver import IETTrainer
from memsafe.train.hooks import TrainHook

class Record(TrainHook):
    name = "record"
    def __init__(self, rows): self.rows = rows
    def on_losses(self, losses, batch, trainer):
        for i, t, l in zip(batch["index"].tolist(), batch["timesteps"].tolist(), losses.detach().cpu().tolist()):
            self.rows.append((i, t, l))
        return None

work = Path(sys.argv[1]); work.mkdir(exist_ok=True)
data = work / "glyphs"
if not data.exists(): glyph_folder(data)
overrides = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
values = {"data": {"source": str(data), "holdout_images": 16}, "train": {"max_steps": 2400, "batch_size": 16},
          "defense": {"name": "iet_agc", "iet_agc": overrides}, "output_dir": str(work / "run")}
config = config_from_dict(values)
train_set, _ = load_dataset(config.data)
rows = []
trainer = IETTrainer(config, train_set, extra_hooks=lambda: [Record(rows)])
trainer.fit(progress=False)
torch.save(rows, work / "rows.pt"); torch.save(trainer.ledger.state_dict(), work / "ledger.pt")
r = torch.tensor(rows, dtype=torch.float64)
idx, t, loss = r[:, 0].long(), r[:, 1].long(), r[:, 2]
late = slice(len(r) // 2, None)
idx, t, loss = idx[late], t[late], loss[late]
logl = loss.clamp_min(1e-12).log()
bins = (t // 20)
curve = torch.zeros(bins.max() + 1, dtype=torch.float64).index_add_(0, bins, logl) / torch.bincount(bins).double().clamp_min(1)
res = logl - curve[bins]
n = len(train_set)
eff = torch.zeros(n).double().index_add_(0, idx, res) / torch.bincount(idx, minlength=n).double().clamp_min(1)
within = res - eff[idx]
skips = trainer.ledger.skips.double() / trainer.ledger.visits.double().clamp_min(1)
found = {"visits": len(res), "log_loss_variance": res.var().item(), "between_sample_variance": eff.var().item(),
         "within_sample_variance": within.var().item(),
         "skip_fraction_quantiles_0_10_25_50_75_90_100": torch.quantile(
             skips, torch.tensor([0, .1, .25, .5, .75, .9, 1]).double()).tolist(),
         "corr_sample_effect_skip_fraction": torch.corrcoef(torch.stack([eff, skips]))[0, 1].item(),
         "settings": {"defense.iet_agc": overrides, "seed": 0}}
print(json.dumps(found, indent=2))
write_json(Path(sys.argv[3]) if len(sys.argv) > 3 else RESULTS / "agc_noise.json", found)
