"""The one exception type for bad user input, and how a system error reads as one line."""

import errno
import numbers


class HsdError(ValueError):
    """Bad input (a path, a spec, a checkpoint, a dataset field...).

    The message names the problem and how to fix it; the CLI prints it as one
    line instead of a traceback.
    """


class HsdWarning(UserWarning):
    """Input that works but is probably not what the user meant (e.g. rows skipped as empty);
    the CLI prints it as one line."""


def os_error_text(err: OSError) -> str:
    """An OSError as one line: the path(s) and the system's reason, with the fix where it is clear."""
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    reason = err.strerror or str(err)
    text = f"{paths}: {reason}" if paths else reason
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        text += "; free some space and run the command again"
    return text


def positive_int(name: str, value, also: str = "") -> int:
    """`value` as an int, when it is a whole number of at least 1: a Python or NumPy integer
    (np.int64 from an array is as good as 8), not a bool, a float or a string. `also` names
    another accepted value in the error ("or None for ...")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise HsdError(f"{name} must be a positive integer{f' ({also})' if also else ''}, got {value!r}")
    return int(value)
