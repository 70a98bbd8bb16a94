"""One writer per run directory: an exclusive `flock` on `RUN/.lock`, held while a process trains or
evaluates the run. The kernel releases it when its holder exits or is killed, so a lock left by a killed
process never blocks the resume."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from memsafe.errors import MemsafeError

LOCK_NAME = ".lock"


def _holder(handle) -> str:
    handle.seek(0)
    try:
        info = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        info = {}
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"process {info.get('pid')} on {info.get('host')} ({info.get('purpose')}, since {since})"


@contextmanager
def run_directory_lock(run_dir: Path, purpose: str, enabled: bool = True):
    """Holds the run directory for `purpose` ("train", "evaluate") until the block ends; refuses with one
    line naming the holder when a live process holds it. `enabled=False` (non-main processes) holds nothing."""
    if not enabled:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MemsafeError(
                f"run directory {run_dir} is in use by {_holder(handle)}: wait for it to finish or stop it"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                                 "since": time.time()}))
        handle.flush()
        yield
    finally:
        handle.close()  # closing the descriptor releases the lock


@contextmanager
def hold_run_directory(run_dir: Path, purpose: str, accelerator=None):
    """`run_directory_lock` for every process of a run: the main process takes it, and a refusal is raised
    on every process (so that none waits at a collective for a main process that stopped)."""
    main = accelerator is None or accelerator.is_main_process
    lock = run_directory_lock(run_dir, purpose, enabled=main)
    refusal = None
    try:
        lock.__enter__()
    except MemsafeError as exc:
        refusal = str(exc)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise MemsafeError(refusal)
    try:
        yield
    finally:
        lock.__exit__(None, None, None)
