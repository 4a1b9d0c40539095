"""How a run stops: Ctrl-C and SIGTERM deferred to the end of a step or a save, and a
failure (a signal, a full disk) turned into one line naming the checkpoint --resume continues from.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from pathlib import Path

from hsd_jax.errors import HsdError
from hsd_jax.train.run_folder import CHECKPOINTS


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message names the intact checkpoint a `--resume` continues from."""


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


@contextlib.contextmanager
def _failures_explained(out: Path, manager):
    """Ctrl-C and a full disk end a run in one line naming the checkpoint --resume continues from."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {_resume_hint(out, manager)}") from None
    except Exception as err:
        full = _disk_full(err)
        if full is None:
            raise
        raise HsdError(f"no space left writing to {out} ({full.strerror or full}); free some space: "
                       f"{_resume_hint(out, manager)}") from None


@contextlib.contextmanager
def _signals_deferred(note: str | None = None):
    """Ctrl-C or SIGTERM inside the block takes effect when it ends; the block gets the list
    of the signals caught so far, to finish early. Orbax starts a save's background threads
    inside `save`; interrupted half-way, it no longer tracks them, so `wait_until_finished`
    returns while they still write, and they die at exit with a traceback (and a torn
    checkpoint). With `note` (printed on the first signal), a second signal takes effect
    at once: whoever presses Ctrl-C twice will not wait."""
    import signal

    caught = []
    previous = {}

    def restore():
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def replay(signum):  # as the handler before ours would have taken it
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)

    def on_signal(signum, frame):
        caught.append(signum)
        if note is None:
            return
        if len(caught) == 1:
            print(f"\n{note}", file=sys.stderr, flush=True)
        else:
            restore()
            replay(signum)

    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # (`cmd &` in a script ignores SIGINT)
                previous[signum] = signal.signal(signum, on_signal)
    except ValueError:  # not the main thread: signals are not ours to handle
        pass
    try:
        yield caught
    finally:
        restore()
    if caught and previous:  # the block ended normally: now the first signal takes effect
        replay(caught[0])


def _disk_full(err: BaseException | None) -> OSError | None:
    """The ENOSPC / EDQUOT error behind `err`, if any (a writer's error may come wrapped)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _resume_hint(out: Path, manager) -> str:
    step = _intact_step(manager)
    if step is None:
        return f"no checkpoint was written yet, and --resume --output {out} starts again from step 0"
    return (f"the last intact checkpoint is step {step} ({out / CHECKPOINTS / str(step)}), "
            "and --resume continues from it")


def _intact_step(manager) -> int | None:
    """The newest complete checkpoint, once a save under way has finished (or failed)."""
    try:
        manager.wait_until_finished()
    except Exception:  # a failed save is no checkpoint, and the step below skips it
        pass
    manager.reload()
    return manager.latest_step()
