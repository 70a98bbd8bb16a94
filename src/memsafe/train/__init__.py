"""Training: one loop, its hooks and its checkpoints."""

from memsafe.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from memsafe.train.hooks import HookList, TrainHook
from memsafe.train.loop import Trainer

__all__ = ["HookList", "TrainHook", "Trainer", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]
