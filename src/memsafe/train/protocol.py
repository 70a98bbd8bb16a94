"""What run directories need of a trainer: `Trainer` (loop.py) is one, a defense's driver (e.g. IET-AGC+'s
rounds of proxies) is another. Both run their work through `loop.drive`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

import torch


class TrainerLike(Protocol):
    config: Any  # RunConfig
    accelerator: Any  # accelerate.Accelerator
    step: int  # optimizer steps taken (over all proxies, for a driver that trains several)
    last_log: dict[str, float]
    ema: Any  # diffusers EMAModel or None
    conditioner: Any  # CaptionConditioner or None (unconditional)
    noise_scheduler: Any

    def fit(self, max_steps: int | None = None, checkpoint_dir: Path | None = None, log_path: Path | None = None,
            progress: bool = True, on_checkpoint: Callable[[Path], None] | None = None) -> dict[str, float]: ...

    def ema_or_model(self, use_ema: bool) -> torch.nn.Module: ...

    def save_checkpoint(self, root: Path) -> Path: ...

    def load_checkpoint(self, path: Path) -> None: ...
