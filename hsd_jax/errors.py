"""The one exception type for bad user input."""


class HsdError(ValueError):
    """Bad input (a path, a spec, a checkpoint, a dataset field...).

    The message names the problem and how to fix it; the CLI prints it as one
    line instead of a traceback.
    """


class HsdWarning(UserWarning):
    """Input that works but is probably not what the user meant (e.g. rows skipped as empty);
    the CLI prints it as one line."""
