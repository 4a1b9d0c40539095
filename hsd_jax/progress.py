"""Progress for long work: a tqdm bar on a terminal, plain lines in a log.

When stderr is not a terminal (a log file, `nohup`, CI, a notebook) a redrawn bar
would come out as one endless line of carriage returns, so the bar is printed as a
new line every `LOG_INTERVAL` seconds instead; a job shorter than that prints nothing,
which keeps test output clean.
"""

from __future__ import annotations

import sys

LOG_INTERVAL = 10.0  # seconds between progress lines in a log


def progress(iterable=None, **kwargs):
    """`tqdm` with hsd-jax's defaults; `disable=True` turns it off, `disable=None` (or no
    `disable`) lets it pick a bar or log lines."""
    if kwargs.get("disable") is None:
        kwargs["disable"] = False
    if kwargs["disable"] or sys.stderr.isatty():
        from tqdm.auto import tqdm

        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, **kwargs)
    from tqdm import tqdm  # not tqdm.auto: a notebook widget would ignore `file`

    kwargs.update(file=_LogLines(sys.stderr), mininterval=LOG_INTERVAL, delay=LOG_INTERVAL, ascii=True,
                  dynamic_ncols=False)
    kwargs.setdefault("ncols", 100)
    return tqdm(iterable, **kwargs)


class _LogLines:
    """A stream for tqdm that writes each redraw of the bar as a line of its own
    (once: closing a bar redraws its last state)."""

    def __init__(self, stream):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        for line in text.replace("\r", "\n").splitlines():
            line = line.rstrip()
            if line and line != self.last:
                self.stream.write(line + "\n")
                self.last = line

    def flush(self) -> None:
        self.stream.flush()
