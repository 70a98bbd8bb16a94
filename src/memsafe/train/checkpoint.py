"""Checkpoints: safetensors weights plus optimizer, schedule, RNG, data position and hook state.

A checkpoint is written to a temporary folder and renamed into place, so a folder named
`checkpoint-<step>` is always complete. Loading never unpickles code (safetensors, weights_only).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memsafe.errors import MemsafeError

PREFIX = "checkpoint-"
# What a full disk or a failing writer raises: OS errors, safetensors' own, torch.save's RuntimeError.
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def _split_state(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Separate tensors (for safetensors) from JSON values, flattening nested dicts with dotted keys."""
    tensors, values = {}, {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu().contiguous()
        elif isinstance(value, dict):
            sub_tensors, sub_values = _split_state(value, f"{name}.")
            tensors.update(sub_tensors)
            values[key] = sub_values
        else:
            values[key] = value
    return tensors, values


def _join_state(tensors: dict[str, torch.Tensor], values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    state: dict[str, Any] = {}
    for key, value in values.items():
        state[key] = _join_state(tensors, value, f"{prefix}{key}.") if isinstance(value, dict) else value
    for name, tensor in tensors.items():
        if name.startswith(prefix) and "." not in name[len(prefix):]:
            state[name[len(prefix):]] = tensor
    return state


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


@contextmanager
def atomic_checkpoint(root: Path, step: int, keep: int, accelerator, every_process_writes: bool = False):
    """Yields a temporary folder to fill; on success it is renamed to `root/checkpoint-<step>` and older
    checkpoints beyond `keep` are pruned. Only the main process fills it (the others get None) unless
    `every_process_writes`, in which case all of them write their parts before the rename."""
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
    if every_process_writes:
        accelerator.wait_for_everyone()
    if not main and not every_process_writes:
        yield None
        accelerator.wait_for_everyone()
        return
    try:
        tmp.mkdir(exist_ok=True)
        yield tmp
        _fsync_tree(tmp)
        if every_process_writes:
            accelerator.wait_for_everyone()
        if main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except WRITE_ERRORS as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MemsafeError(f"could not write checkpoint {final}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        _prune(root, keep)
    accelerator.wait_for_everyone()


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint keeps: all of them, or under LoRA only the adapter's (the frozen base is the
    pretrained model, loaded again on resume)."""
    from memsafe.models.lora import has_lora

    if has_lora(model):
        return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    return model.state_dict()


def load_trained_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = trained_state(model)
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state)) or sorted(set(state) - set(expected))
        raise MemsafeError(f"checkpoint {path} does not match the model (e.g. {missing[0]}); was it written by another config?")
    model.load_state_dict(state, strict=len(expected) == len(model.state_dict()))


def write_trainer_state(trainer, folder: Path) -> None:
    """Model, EMA, optimizer, schedule, RNG, data position and hook state of one Trainer into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trained_state(trainer.unwrapped).items()}, folder / "model.safetensors")
    ema_state = None
    if trainer.ema is not None:
        ema_state = trainer.ema.state_dict()
        shadow = {f"shadow.{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema_state.pop("shadow_params"))}
        save_file(shadow, folder / "ema.safetensors")
    torch.save(trainer.optimizer.state_dict(), folder / "optimizer.pt")
    write_state(folder / "hooks", trainer.hooks.state_dict())
    save_file({"torch_cpu": torch.get_rng_state()}, folder / "rng.safetensors")
    state = {
        "step": trainer.step,
        "batch_position": trainer.batch_position,
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        "ema": ema_state,
    }
    (folder / "trainer_state.json").write_text(json.dumps(state, default=_json_default))


def write_state(stem: Path, state: dict[str, Any]) -> None:
    """A nested dict of tensors and JSON values as `stem.safetensors` + `stem.json`."""
    tensors, values = _split_state(state)
    save_file(tensors or {"_empty": torch.zeros(0)}, stem.with_suffix(".safetensors"))
    stem.with_suffix(".json").write_text(json.dumps(values, default=_json_default))


def read_state(stem: Path) -> dict[str, Any]:
    tensors = {k: v for k, v in load_file(stem.with_suffix(".safetensors")).items() if k != "_empty"}
    return _join_state(tensors, json.loads(stem.with_suffix(".json").read_text()))


def save_checkpoint(trainer, root: Path) -> Path:
    """Write `root/checkpoint-<step>` for one Trainer, atomically."""
    with atomic_checkpoint(root, trainer.step, trainer.config.train.checkpoints_total_limit, trainer.accelerator) as tmp:
        if tmp is not None:
            write_trainer_state(trainer, tmp)
    return root / f"{PREFIX}{trainer.step:08d}"


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if callable(value):
        return None
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        # Renamed first: a process killed while deleting leaves a hidden folder, never a partial checkpoint.
        trash = root / f".trash-{old.name}"
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Temporary and half-deleted folders of a process that was killed."""
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(trainer, path: Path) -> None:
    """Restore everything `write_trainer_state` wrote, so training continues as if never stopped."""
    required = ["model.safetensors", "optimizer.pt", "trainer_state.json", "rng.safetensors", "hooks.safetensors", "hooks.json"]
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise MemsafeError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    state = json.loads((path / "trainer_state.json").read_text())
    load_trained_state(trainer.unwrapped, load_file(path / "model.safetensors"), path)
    trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if trainer.ema is not None:
        if state["ema"] is None or not (path / "ema.safetensors").is_file():
            raise MemsafeError(f"checkpoint {path} has no EMA weights but train.ema is on")
        shadow = load_file(path / "ema.safetensors")
        ema_state = dict(state["ema"])
        ema_state["shadow_params"] = [shadow[f"shadow.{i}"] for i in range(len(shadow))]
        trainer.ema.load_state_dict(ema_state)
        trainer.ema.to(trainer.device)
    trainer.hooks.load_state_dict(read_state(path / "hooks"))
    torch.set_rng_state(load_file(path / "rng.safetensors")["torch_cpu"])
    trainer.step = state["step"]
    trainer.batch_position = state["batch_position"]
