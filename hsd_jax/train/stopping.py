"""How a run stops: Ctrl-C and SIGTERM deferred to the end of a step or a save, every
checkpoint save confirmed (`_Saves`), and a failure (a signal, a save or the model not
written, a full disk) turned into one line naming the checkpoint --resume continues from.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from pathlib import Path

from hsd_jax.errors import HsdError
from hsd_jax.train.run_folder import CHECKPOINTS


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message names the intact checkpoint a `--resume` continues from."""


class SaveFailed(Exception):
    """A checkpoint that was not written: Orbax's save raised, at once or in its background threads."""

    def __init__(self, step: int, cause: BaseException | None):
        super().__init__(f"the checkpoint of step {step} was not written")
        self.step, self.cause = step, cause


class LossNotFinite(Exception):
    """The training loss became nan or inf at `step`: the weights of step - 1 gave it."""

    def __init__(self, step: int, loss: float, bf16: bool):
        super().__init__(f"the training loss became {loss} at step {step}")
        self.step, self.bf16 = step, bf16


class ExportFailed(Exception):
    """The model folder was not written (`_export`); the checkpoints are untouched."""

    def __init__(self, cause: BaseException):
        super().__init__("the model was not written")
        self.cause = cause


class _Saves:
    """Orbax saves of the training state, each confirmed. A save writes in Orbax's background
    threads while training goes on, and a failure there is only logged, so a run that did not
    check would carry on for steps believing it had a checkpoint. `check`, called every step,
    notices the moment a save has ended without its checkpoint and raises `SaveFailed`."""

    def __init__(self, manager):
        self.manager = manager
        self.pending: int | None = None  # the step of the save under way

    def save(self, step: int, state) -> None:
        import orbax.checkpoint as ocp

        self.check(wait=True)  # Orbax waits for it anyway, and would report its failure as this save's
        try:
            self.manager.save(step, args=ocp.args.StandardSave(state))
        except Exception as err:
            raise SaveFailed(step, err) from err
        self.pending = step

    def check(self, wait: bool = False) -> None:
        """Raises `SaveFailed` if the save under way has ended without its checkpoint; with
        `wait`, waits for it to end first."""
        if self.pending is None or (not wait and self.manager.is_saving_in_progress()):
            return
        step, self.pending = self.pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise SaveFailed(step, err) from err
        self.manager.reload()
        if step not in self.manager.all_steps():  # some failures Orbax logs and does not raise
            raise SaveFailed(step, None)


@contextlib.contextmanager
def _export_failures():
    """A write failure while the model folder is written (safetensors', the tokenizer's or
    ours) becomes `ExportFailed`: the checkpoints are intact, and --resume writes the model."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as err:
        raise ExportFailed(err) from err


def _close(manager) -> None:
    """Joins Orbax's writer threads, so none is cut off at exit. By then every save was
    confirmed (`_Saves.check`), or the run is ending on a failure already reported, which
    Orbax may raise again here: nothing new, so it is not raised twice."""
    with _orbax_failures_unlogged(), contextlib.suppress(Exception):
        manager.close()


@contextlib.contextmanager
def _orbax_failures_unlogged():
    """Orbax logs a failed save's traceback (several, from its threads) before raising it,
    and TensorStore's threads print more; the run reports the failure itself, in one line
    (`_failures_explained`), so those are dropped while the block runs. Orbax's other
    messages, and every other unraisable exception, pass."""
    import logging

    def keep(record) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)

    # When a write fails, Orbax stops waiting and closes the event loop it ran the save in;
    # TensorStore's other writes of that save then end (on a full disk, failing too) and call
    # back into the closed loop from their threads: one "RuntimeError: Event loop is closed"
    # for each, dozens, that Python reports as unraisable (a traceback on stderr).
    previous = sys.unraisablehook

    def unraisable(info) -> None:
        if not (isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed"):
            previous(info)

    logger = logging.getLogger("absl")
    logger.addFilter(keep)
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        logger.removeFilter(keep)
        if sys.unraisablehook is unraisable:
            sys.unraisablehook = previous


@contextlib.contextmanager
def _failures_explained(out: Path, manager):
    """Ctrl-C, a checkpoint or model not written, a full disk and a loss that became nan end
    a run in one line naming what is safe (the last intact checkpoint) and the command that
    continues."""
    with _orbax_failures_unlogged():  # also while the line is made: `_intact_step` waits on the failed save
        try:
            yield
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; {_resume_hint(out, manager)}") from None
        except SaveFailed as err:
            full = _disk_full(err.cause)
            reason = full or _first_line(err.cause) or "Orbax logged why"
            raise HsdError(f"could not write the checkpoint of step {err.step} to {out / CHECKPOINTS} ({reason}); "
                           f"{_resume_hint(out, manager, 'free some space' if full else None)}") from None
        except LossNotFinite as err:
            # The checkpoint of the step before holds the weights that gave the loss: resumed,
            # it would give it again at any learning rate, so --resume continues from the one before.
            removed = _remove_checkpoint(manager, err.step - 1)
            removed = f" (the checkpoint of step {err.step - 1}, whose weights gave it, is removed)" if removed else ""
            fix = "lower --learning-rate" + (" (or start again without --bf16 in another --output)" if err.bf16 else "")
            raise HsdError(f"{err}{removed}; {_resume_hint(out, manager, fix)}") from None
        except ExportFailed as err:
            full = _disk_full(err.cause)
            hint = _resume_hint(out, manager, "free some space" if full else None, "writes the model from it")
            raise HsdError(f"could not write the model to {out} ({full or _first_line(err.cause)}); {hint}") from None
        except Exception as err:
            full = _disk_full(err)
            if full is None:
                raise
            raise HsdError(f"no space left writing to {out} ({full}); "
                           f"{_resume_hint(out, manager, 'free some space')}") from None


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


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
# The same errors as other writers word them: TensorStore under Orbax raises a ValueError
# ("RESOURCE_EXHAUSTED ... [os_error_code='28']"), safetensors a SafetensorError ("No space
# left on device (os error 28)").
_DISK_FULL_TEXT = {code: re.compile(rf"os_error_code='?{code}\b|os error {code}\b|\[Errno {code}\]|"
                                    + re.escape(os.strerror(code))) for code in _DISK_FULL}


def _disk_full(err: BaseException | None) -> str | None:
    """"No space left on device" (or the quota's words) when a full disk is behind `err`,
    whichever library raised it and however it came wrapped; None otherwise."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            return os.strerror(err.errno)
        for code, text in _DISK_FULL_TEXT.items():
            if text.search(str(err)):
                return os.strerror(code)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _first_line(err: BaseException | None) -> str:
    """`err` as one line: its type and the first line of its message (library errors run long)."""
    if err is None:
        return ""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"


def _resume_hint(out: Path, manager, first: str | None = None, then: str = "continues from it") -> str:
    """What is safe and the command that continues: the last intact checkpoint, and what
    --resume does with it (`then`), after `first` (what to do before, e.g. free some space)."""
    step = _intact_step(manager)
    if step is None:
        safe, resume = "no checkpoint was written yet", f"--resume --output {out} starts again from step 0"
    else:
        safe, resume = f"the last intact checkpoint is step {step} ({out / CHECKPOINTS / str(step)})", f"--resume {then}"
    return f"{safe}; {first}, then {resume}" if first else f"{safe}, and {resume}"


def _remove_checkpoint(manager, step: int) -> bool:
    """Deletes the checkpoint of `step` if it is the newest complete one; whether it did."""
    if _intact_step(manager) != step:
        return False
    manager.delete(step)
    return True


def _intact_step(manager) -> int | None:
    """The newest complete checkpoint, once a save under way has finished (or failed)."""
    try:
        manager.wait_until_finished()
    except Exception:  # a failed save is no checkpoint, and the step below skips it
        pass
    manager.reload()
    return manager.latest_step()
