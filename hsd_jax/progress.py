"""Progress bars for long work (tqdm; silent when output is not a terminal and in CI)."""

from __future__ import annotations

import os
import sys


def progress(iterable=None, **kwargs):
    """`tqdm` with hsd-jax's defaults: off when stderr is not a terminal or CI is set,
    unless the caller forces `disable=False`."""
    from tqdm.auto import tqdm

    if "disable" not in kwargs or kwargs["disable"] is None:
        kwargs["disable"] = bool(os.environ.get("CI")) or not sys.stderr.isatty()
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
