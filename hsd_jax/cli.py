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
it; `backend_problem` turns that failure into one line here, for every command.
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    _quiet_without_torch()
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


def _quiet_without_torch() -> None:
    """The default install has no torch (BERTScore's extra brings it), and hsd-jax uses only
    transformers' tokenizers and configs; transformers would say "PyTorch was not found.
    Models won't be available" on every command. That advice is silenced then."""
    import importlib.util

    try:
        missing = importlib.util.find_spec("torch") is None
    except (ImportError, ValueError):  # a broken or blocked torch
        missing = True
    if missing:
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


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


# The fix for each platform JAX_PLATFORMS may ask for and this install cannot start
# (docs.jax.dev/en/latest/installation.html: cuda13 leads there, cuda12 serves older drivers).
_INSTALL = {
    "cuda": 'install it with pip install -U "jax[cuda13]" (or "jax[cuda12]" for a CUDA 12 driver)',
    "rocm": "install JAX's ROCm plugin (docs.jax.dev/en/latest/installation.html)",
    "tpu": 'on a TPU VM, install it with pip install -U "jax[tpu]"',
}


def backend_problem(err: BaseException) -> str | None:
    """One line for a failure of JAX to start the backend JAX_PLATFORMS asks for, naming the
    fix; None for any other error. JAX raises a bare AssertionError when cuda is asked for
    and none is there, a RuntimeError for other platforms; both come from its xla_bridge."""
    wanted = os.environ.get("JAX_PLATFORMS", "").strip()
    if not wanted or not isinstance(err, (AssertionError, RuntimeError)) or not _raised_in_xla_bridge(err):
        return None
    asked = [p.strip().lower() for p in wanted.split(",") if p.strip()]
    unset = "or unset JAX_PLATFORMS to let JAX use what it has (the CPU at least)"
    if any(p in ("cuda", "gpu") for p in asked):  # "gpu" means cuda or rocm
        if not _cuda_plugin_installed():
            return (f"JAX_PLATFORMS={wanted} asks for an NVIDIA GPU, but this JAX install has no CUDA backend "
                    f"(jaxlib without the CUDA plugin); {_INSTALL['cuda']}, {unset}")
        return (f"JAX_PLATFORMS={wanted} asks for an NVIDIA GPU, but JAX sees none (check nvidia-smi and "
                f"CUDA_VISIBLE_DEVICES), {unset}")
    reason = str(err).split(" (set JAX_PLATFORMS=")[0]  # JAX's own advice, said better below
    unknown = [p for p in asked if p not in ("cpu", *_INSTALL)]
    if unknown:
        return (f"JAX_PLATFORMS={wanted}: {unknown[0]!r} is not a JAX platform; set it to cpu, cuda, rocm or tpu "
                f"(comma-separated, first choice first), {unset}")
    missing = next(p for p in asked if p in _INSTALL)
    if "not in the list of known backends" in reason:
        reason = f"this JAX install has no {missing} backend"
    else:
        reason = f"JAX cannot start it ({reason.split(': ', 1)[-1]})"
    return f"JAX_PLATFORMS={wanted} asks for {missing}, but {reason}; {_INSTALL[missing]}, {unset}"


def _raised_in_xla_bridge(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None:
        if os.path.basename(tb.tb_frame.f_code.co_filename) == "xla_bridge.py":
            return True
        tb = tb.tb_next
    return False


def _cuda_plugin_installed() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(f"jax_cuda{v}_plugin") is not None for v in (12, 13))


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
