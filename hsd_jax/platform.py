"""JAX_PLATFORMS that this install cannot serve, said in one line.

JAX starts the platform JAX_PLATFORMS names at the first use of a device, wherever that
happens (loading weights, a generate call, a training step), and fails there with a bare
AssertionError (cuda without the CUDA plugin) or a RuntimeError (other platforms) from its
xla_bridge. `backend_problem` says what is wrong and how to fix it; the CLI prints it, the
library raises it as an HsdError (`explained`).
"""

from __future__ import annotations

import contextlib
import os

from hsd_jax.errors import HsdError

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
def explained():
    """Runs the block; a failure to start the platform JAX_PLATFORMS asks for becomes an
    HsdError naming the fix, any other error goes on as it was."""
    try:
        yield
    except (AssertionError, RuntimeError) as err:
        problem = backend_problem(err)
        if problem is None:
            raise
        raise HsdError(problem) from None


def device_memory(device) -> int | None:
    """The bytes one device can hold: an accelerator's allocator limit, the machine's physical
    memory for a CPU device; None where it is not known."""
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # a backend without memory statistics
        return None
    return stats.get("bytes_limit")
