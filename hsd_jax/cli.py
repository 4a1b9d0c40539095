"""The `hsd-jax` command line.

Each subcommand lives in its own module under `hsd_jax/commands/` and exposes
`register(subparsers)`; the module imports JAX lazily inside its handler so
that `hsd-jax --help` stays instant.

SIGTERM (kill, a scheduler's time limit, docker stop) takes Ctrl-C's path: the command
saves what it finished and says so in one line. The exit code tells them apart, as a
shell would (130 for SIGINT, 143 = 128 + 15 for SIGTERM), so a scheduler still sees a
terminated job.

A JAX_PLATFORMS that this install cannot serve (cuda without the CUDA plugin, a name JAX
does not know) fails inside JAX at the first use of a device, wherever a command makes
it; `platform.backend_problem` turns that failure into one line here, for every command.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import warnings

from hsd_jax.errors import HsdError, HsdWarning, os_error_text
from hsd_jax.platform import backend_problem

# Subcommand modules, in the order `--help` lists them.
COMMANDS = ("demo", "generate", "schedule", "train", "eval", "bench")

# Exit codes the shell gives a process killed by these signals (128 + the signal number).
INTERRUPTED, TERMINATED = 130, 128 + signal.SIGTERM


class _DefaultsFormatter(argparse.HelpFormatter):
    """`--help` names every option's default, unless its text already does or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".strip()


class _Parser(argparse.ArgumentParser):
    """A bad command line is one line, like every other error of hsd-jax and its scripts,
    instead of argparse's usage block (a dozen lines for generate) above the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; {self.prog} --help lists the options\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hsd-jax",
        description="Layer-skipping text generation (HSD, SkipDecode, CALM) for GPT-2 and Phi-2 in JAX.",
        epilog="Exit status: 0 done; 2 bad input or a system error (one line on stderr); 130 Ctrl-C and "
        "143 SIGTERM, after saving what was finished (generate, train and eval then continue with --resume).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"hsd_jax.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"hsd_jax.commands.{name}":
                raise
            continue  # not written yet
        module.register(sub)
    for subparser in sub.choices.values():
        if subparser.formatter_class is argparse.HelpFormatter:  # keep a command's own choice (bench's None)
            subparser.formatter_class = _DefaultsFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a command; returns its exit code. Run as the program (no `argv`), an interrupted
    command ends the process itself (see `_exit_now`)."""
    try:
        code = _run(argv)
        sys.stdout.flush()  # so a closed pipe shows up here, not as a message at exit
    except BrokenPipeError:
        # The reader stopped reading (`hsd-jax schedule ... | head -1`): its choice, not a failure.
        stdout_to_devnull()
        return 0
    if argv is None and code in (INTERRUPTED, TERMINATED):
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """Ends the process at once, after its line is out. Interrupted inside a jit compile, XLA's
    compiler threads go on working while the interpreter shuts down, and the process segfaulted
    (exit 139, 2 tries in 4) instead of ending with 130. Everything worth keeping is saved
    before the command returns (rows written and synced, checkpoints joined), so the usual
    teardown has nothing left to do."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: its reader has gone
            stream.flush()
    os._exit(code)


def stdout_to_devnull() -> None:
    """After a closed pipe: as Python's docs advise, stdout goes to devnull, so later prints
    and the flush at exit are quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    def one_line(message, category, *rest, **kw):  # our warnings read like our errors
        if issubclass(category, HsdWarning):
            return f"hsd-jax {args.command}: warning: {message}\n"
        return default_formatwarning(message, category, *rest, **kw)

    # The format, not the display: a caller recording warnings (pytest.warns, catch_warnings)
    # still gets them, where a replaced showwarning printed them past the record.
    default_formatwarning = warnings.formatwarning
    warnings.formatwarning = one_line
    terminated = []
    try:
        with _sigterm_as_ctrl_c(terminated):
            code = int(args.func(args) or 0)
    except HsdError as err:
        print(f"hsd-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if isinstance(err, BrokenPipeError):
            raise  # main's: a closed pipe is the reader's choice, not an error
        print(f"hsd-jax {args.command}: error: {os_error_text(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # JAX failing to start the platform asked for; any other error goes on up
        problem = backend_problem(err)
        if problem is None:
            raise
        print(f"hsd-jax {args.command}: error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a command with rows to save says so itself and returns 130
        print(f"hsd-jax {args.command}: interrupted", file=sys.stderr)
        code = INTERRUPTED
    finally:
        warnings.formatwarning = default_formatwarning
    # SIGTERM ran the Ctrl-C path (work saved, one line), but the exit code says which
    # signal it was, so a scheduler that sent it sees the job as terminated.
    return TERMINATED if terminated and code == INTERRUPTED else code


@contextlib.contextmanager
def _sigterm_as_ctrl_c(terminated: list):
    """SIGTERM (kill, a scheduler's timeout, docker stop) raises KeyboardInterrupt, so every
    command saves what it finished and ends in one line, as on Ctrl-C; `terminated` records it."""
    def on_sigterm(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread (hsd-jax called from a worker): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
