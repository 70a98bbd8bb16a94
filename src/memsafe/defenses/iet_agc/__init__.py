"""IET-AGC+: sample-level memorization defense by shard-ensemble training (docs/defenses/iet_agc.md).

- IET (driver.py): the training set is split into K shards; each round, K proxy models start from the global
  weights, each trains on its own shard, and the global model becomes their average weighted by shard size.
  An image reaches only the proxy of its shard.
- AGC (agc.py, the reference code's rule): each proxy keeps a per-timestep loss bank (EMA 0.8, starting at 0);
  a sample is skipped when its loss is below bank[t] / lambda; the bank is updated with every sample afterwards.
- AGC+ redistribution (shards.py): samples skipped in at least `redistribute_threshold` of their visits in a
  round move to another shard, whose proxy has not fit them yet.
- AGC+ augmentation (augment.py): a sample's augmentation strength rises from 0 (loss at or above the bank's
  running mean) to 1 (loss at the skipping threshold), from the relative loss seen at its last visit.

Profiles (config.py) fill the settings a config leaves unset: `loss` (4 shards, AGC on the loss averaged over
a sample's visits) for unconditional models, `caption` (one shard, AGC on the caption's gain at mid noise) for
text-conditional ones, `reference` (the reference code's rule) on request.

Differences from the reference, by design: a batch whose samples are all skipped makes no update (the
reference still steps Adam on a zero loss, so momentum keeps moving the weights); per-sample skip counts
are recorded (commented out in the reference).
"""

from __future__ import annotations

from memsafe.defenses.contract import Defense
from memsafe.defenses.iet_agc.config import IETConfig, validate


def _driver(config, train_set, extra_hooks):
    from memsafe.defenses.iet_agc.driver import IETTrainer

    return IETTrainer(config, train_set, extra_hooks=extra_hooks)


def _report(report, run_dir, metrics, log_rows):
    from memsafe.defenses.iet_agc.report import add_skip_rate

    add_skip_rate(report, run_dir, log_rows)


DEFENSE = Defense(
    name="iet_agc",
    config=IETConfig,
    summary="IET-AGC+ (sample level): shard proxies averaged each round, low-loss samples skipped",
    validate=validate,
    driver=_driver,
    report=_report,
)
