"""Several processes (hosts) working as one, and the devices a process decodes on.

- `maybe_initialize`: `jax.distributed.initialize()` when a launcher's environment
  describes several processes (training and the decoding commands call it first).
- `local_devices`: the devices of this process that a decode is split over
  (`hsd_jax.generate`'s `devices=`; the engine shards the batch over them).
- The exchange of a multi-process decode (`hsd-jax generate --input-file`, `hsd-jax
  eval`): every process decodes its share of the batches on its own devices and hands
  the rows to process 0, which writes them in input order. They travel through the key-value
  store of `jax.distributed`'s coordination service (`put` / `get`), so no shared file
  system is needed; decisions that read the output folder (what an earlier run left)
  are process 0's alone and reach the others the same way (`lead_decides`), and
  `together` makes the others wait until process 0 has written everything.

How to launch it is in docs/multihost.md. JAX is imported inside the functions, so
`hsd-jax --help` stays fast.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import zlib
from typing import Any, Callable, Iterator

from hsd_jax.errors import HsdError, positive_int

# Keys of one launch are numbered in the order the processes reach them: every process
# runs the same command over the same input, so they reach the same keys in the same order.
_numbers = itertools.count()
_PREFIX = "hsd-jax"
_ABORT = f"{_PREFIX}/abort"  # a process that fails says so here, so none waits for it forever
_CHUNK = 1 << 20  # bytes per stored value: a batch's rows may exceed the store's message size
_POLL_MS = 2_000  # a waiting process checks for a failed one this often


def maybe_initialize() -> bool:
    """`jax.distributed.initialize()` only when the environment describes several processes.

    Explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES (> 1), JAX_PROCESS_ID. Or a
    cluster JAX detects itself (SLURM, Open MPI) with more than one task. Must run
    before anything touches a JAX device.
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env.get("JAX_PROCESS_ID", "0")))
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()
        return True
    return False


def process_index() -> int:
    import jax

    return jax.process_index()


def process_count() -> int:
    import jax

    return jax.process_count()


def is_lead() -> bool:
    """Whether this process writes the output (process 0; the only one without jax.distributed)."""
    return process_index() == 0


def local_devices(devices: int | None = None) -> list:
    """The devices of this process a decode is split over: all of them (None) or the first `devices`."""
    import jax

    available = jax.local_devices()
    if devices is None:
        return available
    devices = positive_int("devices", devices, "or None for all local devices")
    if devices > len(available):
        kind = available[0].platform.upper()
        raise HsdError(f"devices={devices}, but this process has {len(available)} {kind} device"
                       f"{'s' if len(available) > 1 else ''}; ask for at most {len(available)}, or leave it out "
                       "to use them all")
    return available[:devices]


def shared_device_count(devices: int | None = None) -> int:
    """How many devices each process decodes on when the processes split the input: `devices`,
    or the fewest local devices any process has, so every process cuts the same batches."""
    import jax

    if devices is not None:
        return len(local_devices(devices))
    counts: dict[int, int] = {}
    for d in jax.devices():
        counts[d.process_index] = counts.get(d.process_index, 0) + 1
    return min(counts.values())


# ---------------------------------------------------------------- the key-value exchange


def _client():
    # The coordination service's key-value store, reached as jax's own multihost_utils and
    # Orbax reach it (JAX has no public name for it).
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise HsdError("jax.distributed is not initialised; set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                       "JAX_PROCESS_ID (docs/multihost.md) before the command starts")
    return client


def new_key(name: str) -> str:
    """A key no earlier exchange of this launch used (the same on every process, see `_numbers`)."""
    return f"{_PREFIX}/{next(_numbers)}/{name}"


def put(key: str, value: Any) -> None:
    """Stores a JSON value under `key`, compressed and in parts; the part count goes last, so
    a reader that finds it finds every part."""
    client = _client()
    data = zlib.compress(json.dumps(value).encode())
    parts = [data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)]
    for i, part in enumerate(parts):
        client.key_value_set_bytes(f"{key}/{i}", part)
    client.key_value_set(f"{key}/parts", str(len(parts)))


def get(key: str, *, consume: bool = True) -> Any:
    """The value `put` under `key`, waiting for it as long as no process has failed
    (`abort`); `consume` deletes it (a value only one process reads)."""
    import jax

    client = _client()
    while True:
        try:
            count = int(client.blocking_key_value_get(f"{key}/parts", _POLL_MS))
            break
        except jax.errors.JaxRuntimeError as err:
            if "DEADLINE_EXCEEDED" not in str(err):  # not the poll's timeout: the service is gone
                raise HsdError(f"lost the other processes ({str(err).splitlines()[0]}); one of them has probably "
                               "died: see its log") from None
        _raise_if_aborted(client)
    data = b"".join(client.blocking_key_value_get_bytes(f"{key}/{i}", _POLL_MS) for i in range(count))
    if consume:
        for i in range(count):
            client.key_value_delete(f"{key}/{i}")
        client.key_value_delete(f"{key}/parts")
    return json.loads(zlib.decompress(data))


def _aborted(client) -> str | None:
    import jax

    try:
        return client.key_value_try_get(_ABORT)
    except jax.errors.JaxRuntimeError as err:
        if "NOT_FOUND" in str(err):  # nobody has failed
            return None
        raise


def abort(message: str) -> None:
    """Tells the other processes that this one stopped (the first message stays)."""
    with contextlib.suppress(Exception):  # already set by another process, or the service is gone: fine
        _client().key_value_set(_ABORT, f"process {process_index()} stopped: {message}")


def lead_decides(name: str, decide: Callable[[], Any]) -> Any:
    """`decide()` on process 0, and its (JSON) result on every process; an HsdError it raises
    is raised on every process. One process alone, it is just `decide()`.

    For what only one process may decide: what an earlier run left in the output, which
    process 0 reads and may then replace."""
    if process_count() == 1:
        return decide()
    key = new_key(name)
    if is_lead():
        try:
            value = decide()
        except BaseException as err:
            put(key, {"error": str(err) if isinstance(err, HsdError) else f"{type(err).__name__}: {err}"})
            raise
        put(key, {"value": value})
        return value
    got = get(key, consume=False)
    if "error" in got:
        raise HsdError(f"process 0: {got['error']}")
    return got["value"]


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
    """Around a command's work over several processes: process 0 says when it has written
    everything (or failed), and the others wait for that before they exit, so that a
    launcher sees every process end with the run's outcome. A process that fails tells the
    others (`abort`). One process alone, it does nothing."""
    if process_count() == 1:
        yield
        return
    key = new_key(f"{what}-finished")
    try:
        yield
    except BaseException as err:
        text = "interrupted" if isinstance(err, KeyboardInterrupt) else str(err) or type(err).__name__
        abort(text)
        if is_lead():
            put(key, {"error": text})
        raise
    if is_lead():
        put(key, {"ok": True})
        return
    print(f"process {process_index()}: share decoded; waiting for process 0 to write the output", file=sys.stderr,
          flush=True)
    got = get(key, consume=False)
    if "error" in got:
        raise HsdError(f"process 0 stopped: {got['error']}")


def split_batches(firsts: list[int], decode: Callable[[int], Any], to_json: Callable[[Any], Any],
                  from_json: Callable[[Any], Any], *, desc: str) -> Iterator[tuple[int, Any]]:
    """The batches starting at `firsts`, dealt to the processes in turn (batch j to process
    j mod P): each process runs `decode(first)` on its own. Process 0 yields (first,
    result) for every batch in input order, the others' results received as they finish;
    the other processes yield nothing. Each process shows the progress of its own share."""
    from hsd_jax.progress import progress

    base = new_key("batches")
    me, count = process_index(), process_count()
    mine = firsts[me::count]
    bar = progress(total=len(mine), desc=f"{desc} [process {me} of {count}]", unit="batch",
                   disable=None if len(mine) > 1 else True)
    try:
        for j, first in enumerate(firsts):
            if j % count == me:
                _raise_if_aborted(_client())  # a failed process stops the others at their next batch
                result = decode(first)
                bar.update()
                if me != 0:
                    put(f"{base}/{first}", to_json(result))
                    continue
            elif me == 0:
                result = from_json(get(f"{base}/{first}"))
            else:
                continue
            yield first, result
    finally:
        bar.close()


def _raise_if_aborted(client) -> None:
    stopped = _aborted(client)
    if stopped is not None:
        raise HsdError(f"{stopped}; the other processes stop too")
