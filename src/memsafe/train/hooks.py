"""The interface through which defenses join the training loop, which knows none of them by name.

The loop calls, per optimizer step:
    batch = on_batch_start(batch, trainer)          # e.g. per-sample augmentation; may drop draws (select_draws)
    weights = on_losses(losses, batch, trainer)     # per-sample weights; 0 skips a sample
    on_after_backward(model, trainer)               # e.g. project gradients
    on_after_step(model, trainer)                   # e.g. project the optimizer's update
and on_train_start / on_round_end around whole phases, and on_sync before the weights leave the loop (a
checkpoint, the end of fit, an IET aggregation). Each hook can carry state through checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from memsafe.train.loop import Trainer


def select_draws(batch: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """The batch without the draws where `keep` is False, for a hook that decides a draw's fate before the
    forward pass (a dropped draw costs nothing). `drawn` keeps the count drawn, for the loop's kept fraction."""
    size = len(keep)

    def pick(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            return value[keep.to(value.device)]
        if isinstance(value, list) and len(value) == size:
            return [item for item, kept in zip(value, keep.tolist()) if kept]
        if isinstance(value, dict):
            return {key: pick(item) for key, item in value.items()}
        return value

    return {key: pick(value) for key, value in batch.items()} | {"drawn": batch.get("drawn", size)}


class TrainHook:
    name = "hook"

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_batch_start(self, batch: dict[str, Any], trainer: Trainer) -> dict[str, Any]:
        return batch

    def on_losses(self, losses: torch.Tensor, batch: dict[str, Any], trainer: Trainer) -> torch.Tensor | None:
        """Per-sample weights for this batch (None keeps every sample at weight 1)."""
        return None

    def on_after_backward(self, model: torch.nn.Module, trainer: Trainer) -> None:
        pass

    def on_after_step(self, model: torch.nn.Module, trainer: Trainer) -> None:
        pass

    def on_round_end(self, trainer: Trainer, round_index: int) -> None:
        pass

    def on_sync(self, trainer: Trainer) -> None:
        """Bring deferred work up to date: the weights are about to be saved, averaged or handed out."""

    def log_values(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Tensors and JSON-serialisable values; saved with every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class HookList(TrainHook):
    """Runs several hooks in order; sample weights multiply."""

    def __init__(self, hooks: list[TrainHook] | tuple[TrainHook, ...] = ()):
        self.hooks = list(hooks)
        names = [h.name for h in self.hooks]
        if len(set(names)) != len(names):
            raise ValueError(f"hook names must be unique, got {names}")

    def on_train_start(self, trainer):
        for hook in self.hooks:
            hook.on_train_start(trainer)

    def on_batch_start(self, batch, trainer):
        for hook in self.hooks:
            batch = hook.on_batch_start(batch, trainer)
        return batch

    def on_losses(self, losses, batch, trainer):
        weights = torch.ones_like(losses)
        for hook in self.hooks:
            hook_weights = hook.on_losses(losses, batch, trainer)
            if hook_weights is not None:
                weights = weights * hook_weights.to(weights)
        return weights

    def on_after_backward(self, model, trainer):
        for hook in self.hooks:
            hook.on_after_backward(model, trainer)

    def on_after_step(self, model, trainer):
        for hook in self.hooks:
            hook.on_after_step(model, trainer)

    def on_round_end(self, trainer, round_index):
        for hook in self.hooks:
            hook.on_round_end(trainer, round_index)

    def on_sync(self, trainer):
        for hook in self.hooks:
            hook.on_sync(trainer)

    def log_values(self):
        values = {}
        for hook in self.hooks:
            values.update({f"{hook.name}/{k}": v for k, v in hook.log_values().items()})
        return values

    def state_dict(self):
        return {hook.name: hook.state_dict() for hook in self.hooks}

    def load_state_dict(self, state):
        for hook in self.hooks:
            hook.load_state_dict(state.get(hook.name, {}))
