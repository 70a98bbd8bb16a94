"""memsafe's progress bars: tqdm on a terminal; elsewhere (a log file, CI) one line per bar, when it ends,
instead of a carriage-return update every few hundred milliseconds."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class progress_bar(tqdm):  # noqa: N801 - used like tqdm itself
    """tqdm that, when its stream is not a terminal, draws nothing while it runs and writes its final state
    as one line when it closes (bars with leave=False write nothing at all)."""

    def __init__(self, *args, **kwargs):
        stream = kwargs.get("file") or sys.stderr
        self._one_line = not _is_terminal(stream)
        if self._one_line and kwargs.get("leave") is False:
            kwargs["disable"] = True
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if self._one_line:
            return True
        return super().display(msg, pos)

    def close(self):
        if not self._one_line or self.disable:
            return super().close()
        self.disable = True
        self._decr_instances(self)
        self.fp.write(str(self) + "\n")
        self.fp.flush()


def close_all_bars() -> None:
    """Ends every open bar, so that what is printed next (an error) starts on a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
