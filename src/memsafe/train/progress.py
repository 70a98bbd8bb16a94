"""What a training run shows and records while it runs: a progress bar and a JSON-lines log."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from memsafe.progress import progress_bar


class JsonLines:
    def __init__(self, path: Path | None):
        self.handle = open(path, "a") if path else None

    def write(self, step: int, values: dict) -> None:
        if self.handle:
            self.handle.write(json.dumps({"step": step, **values}) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle:
            self.handle.close()


@contextmanager
def run_display(total: int, initial: int, desc: str, show_bar: bool, log_path: Path | None):
    """(progress bar, log): the bar is silent unless `show_bar`, the log writes nothing without a path."""
    bar = progress_bar(total=total, initial=initial, desc=desc, unit="step", disable=not show_bar)
    log = JsonLines(log_path)
    try:
        yield bar, log
    finally:
        bar.close()
        log.close()
