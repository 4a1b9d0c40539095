"""The decode engine: prefill, the step loop, and the compiled programs that run them.

A `Decoder` (one per model, `model.decoder`) owns its compiled programs in a bounded
cache keyed by everything that changes a program: the step strategy's own key, the
search (greedy / beam settings), the batch shape, the cache length and the weights'
dtype. `hsd_jax.generate` is a thin function over it.

What a decode step does is a *step strategy* (`Strategy`), plugged into one loop:

- `ScheduleSteps` (here): the static-schedule compiler. Its op table (RUN /
  PROPAGATE / SKIP per step and layer) is either an argument of the program, each
  layer a `lax.switch` on its op ("compiled": any schedule of the same shape reuses
  the program), or baked in as segments of identical steps, each its own
  `while_loop` holding only its layers ("static": no per-layer branch at all).
- `hsd_jax.calm.CalmSteps`: CALM, whose exits are decided at run time.
- `hsd_jax.speculative.SpeculativeSteps`: lossless self-speculative greedy decoding, a
  strategy of its own loop (rounds of k draft steps under a schedule and one all-layer
  verify pass), which returns its acceptance counts with the state.

Every strategy also has an eager form, a Python loop over steps that calls the same
layer primitives: the reference the compiled programs are checked against.

The weights are read in the decode layout (`hsd_jax.models.decode_layout`): per-layer
pytrees with (out, in) kernels. The model is converted to it once, in place
(`CausalLM.to_layout`), so there is one copy of the weights.

Data parallel (`devices`): over several devices, one program decodes the batch split on
a "data" mesh axis: the weights replicated (one copy per device), the prompts, the KV
cache and the search state sharded by rows (`shard_rows`), each input's beams on one
device (an input's K beam rows are contiguous). The program is the one-device program,
partitioned by XLA: batch-wide decisions (the loop's "all rows done", CALM's exit=batch
rule, the speculative batch minimum) are taken over the whole batch, as on one device.
The rows are padded to a multiple of the device count with copies of the last row,
which change no batch-wide decision (a copy is done, confident or agreed exactly when
its original is) and are dropped from the results, so the output is one device's.
"""

from __future__ import annotations

import collections
import dataclasses
import time
import weakref
from typing import Any, Callable, Hashable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hsd_jax.models import RUN, KVCache, ModelConfig, decode_step, forward
from hsd_jax.schedules import Schedule

MODES = ("compiled", "static", "eager")

# A step function: (params, last tokens (R,), cache, decode step t, live rows (R,) bool)
# -> (logits (R, V), cache, layers run: () for every row, or (R,) per row as CALM's exits
# give). Only CALM's exit test looks at the live rows. The search state records the layers
# with each row's tokens (`hsd_jax.search`: a beam's record follows it through reorders).
StepFn = Callable[[Any, jax.Array, KVCache, Any, jax.Array], tuple[jax.Array, KVCache, jax.Array]]
# The loop a strategy drives: (params, search, state, step, until) -> state.
Loop = Callable[..., Any]


class Strategy(Protocol):
    """What a decode step does, plugged into the engine's loop."""

    def program_key(self) -> Hashable:
        """What about this strategy shapes the compiled program (values passed as
        `arguments` do not: changing them reuses it)."""

    def arguments(self) -> tuple:
        """Arrays the compiled program takes at run time."""

    def decode(self, params, config: ModelConfig, search, state, loop: Loop, *arguments):
        """Traced: every decode step after the prefill, through `loop`. Returns the
        search state, or (state, stats): a dict of the strategy's counts, each () or (rows,)
        (a count per row, which the engine sums over the real rows)
        (`hsd_jax.speculative.SpeculativeSteps` runs its own loop over rounds this way)."""

    def eager_step(self, params, config: ModelConfig, tokens, cache: KVCache, t: int, live):
        """One step on the host, the reference: (logits, cache, layers run).

        A strategy that is not a step (speculative rounds) defines instead
        `eager_decode(params, config, search, state) -> (state, stats)`, and may ask for
        `extra_cache_slots` beyond prompt + new tokens."""


@dataclasses.dataclass(frozen=True)
class ScheduleSteps:
    """A static schedule, as one program with the op table as an argument ("compiled"),
    or with its segments baked in ("static")."""

    schedule: Schedule
    static: bool = False

    def program_key(self) -> Hashable:
        if self.static:
            return ("static", self._segments())
        return ("compiled", self.schedule.layer_ops().shape)

    def arguments(self) -> tuple:
        return () if self.static else (jnp.asarray(self.schedule.layer_ops(), jnp.int32),)

    def decode(self, params, config, search, state, loop: Loop, *arguments):
        if not self.static:
            (ops,) = arguments
            return loop(params, search, state, schedule_step(config, lambda t: ops[t]))
        for _, stop, ops in self._segments():
            step = schedule_step(config, lambda t, ops=ops: ops)
            state = loop(params, search, state, step, until=stop)
        return state

    def eager_step(self, params, config, tokens, cache, t, live):
        ops = tuple(int(op) for op in self.schedule.layer_ops()[t])
        logits, cache = decode_step(params, config, tokens, cache, ops)
        return logits, cache, sum(op == RUN for op in ops)

    def _segments(self) -> tuple:
        return tuple((start, stop, tuple(int(op) for op in row)) for start, stop, row in self.schedule.segments())


def schedule_step(config: ModelConfig, ops_of: Callable[[Any], Any]) -> StepFn:
    """A decode step that runs the layer ops `ops_of(t)` (a tuple of ints, or a traced (L,) array)."""

    def step(params, tokens, cache, t, live):
        ops = ops_of(t)
        logits, cache = decode_step(params, config, tokens, cache, ops)
        n = sum(op == RUN for op in ops) if isinstance(ops, tuple) else jnp.sum(ops == RUN)
        return logits, cache, jnp.asarray(n, jnp.int32)

    return step


# ------------------------------------------------------------------ the loop


def prefill(params, config: ModelConfig, search, ids, mask, cache_len: int):
    """Every layer over the prompts; the search state after its first token (made by
    all layers)."""
    cache = KVCache.init(config, ids.shape[0], cache_len, _dtype(params))
    # An all-false `valid` is a constant that XLA would fold through the prompt's
    # (B, H, T, S) cache attention scores, slowly (8 s of compile at a 512-token
    # prompt); the barrier keeps it a value.
    cache = cache.replace(valid=jax.lax.optimization_barrier(cache.valid))
    logits, cache = forward(params, config, ids, mask, cache, last_only=True)
    # Each prompt is run once; beam search then copies its cache and logits to its beams.
    logits = jnp.repeat(logits[:, -1], search.num_beams, axis=0)
    return search.update(search.init(cache, ids.shape[0]), logits, config.num_layers)


def loop(params, search, state, step: StepFn, until: int | None = None):
    """Decode steps while the search is not done (and, if given, step < `until`)."""

    def cond(state):
        more = ~search.done(state)
        return more if until is None else more & (state.i - 1 < until)

    def body(state):
        t = state.i - 1  # decode step t consumes token t and produces token t + 1
        logits, cache, n = step(params, search.last_tokens(state), state.cache, t, search.live(state))
        return search.update(state.replace(cache=cache), logits, n)

    return jax.lax.while_loop(cond, body, state)


def _dtype(params):
    return jax.tree.leaves(params)[0].dtype


def shard_rows(tree, mesh):
    """`tree` (a search state, inside the program) constrained to the "data" axis: every array
    leads with its rows (B, or B x K beam-major: an input's beams stay on one device), and
    scalars are replicated. XLA would otherwise be free to keep the KV cache, made from
    zeros, whole on every device."""
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rows if x.ndim else replicated), tree)


def pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
    """`x` with copies of its last row appended up to a multiple of `multiple` rows."""
    extra = -len(x) % multiple
    return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) if extra else x


@dataclasses.dataclass
class Decoded:
    tokens: np.ndarray  # (B, N) best sequence of each input
    step_layers: np.ndarray  # (B, N) layers run for each of `tokens`
    steps: int  # tokens generated per row before the batch stopped
    compile_seconds: float  # 0.0 when the program came from the cache
    decode_seconds: float
    stats: dict = dataclasses.field(default_factory=dict)  # a strategy's own counts (ints), if it keeps any
    devices: int = 1  # devices the batch was split over


class Decoder:
    """Runs prefill + decode loop for one model config, and owns the compiled programs.

    `max_programs` bounds the cache (least recently used goes first): a long
    evaluation over many schedules and batch shapes keeps the recent ones.
    """

    def __init__(self, config: ModelConfig, max_programs: int = 32):
        self.config = config
        self.max_programs = max_programs
        self._programs: collections.OrderedDict = collections.OrderedDict()
        self._placed = None  # (token, devices, the weights (weak references), the weights on those devices)

    def __len__(self) -> int:
        return len(self._programs)

    def decode(self, params, strategy: Strategy, search, ids, mask, cache_len: int, mode: str = "compiled",
               devices=None) -> Decoded:
        """Decodes (B, T) left-padded `ids` / `mask`; `params` in the decode layout.

        `devices` (a sequence of devices; None: the default device) is what the batch is
        split over, at most one device per row; "eager" runs on one device."""
        ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
        cache_len += getattr(strategy, "extra_cache_slots", 0)
        if mode == "eager":
            start = time.perf_counter()
            tokens, layers, steps, stats = self._eager(params, strategy, search, jnp.asarray(ids), jnp.asarray(mask),
                                                       cache_len)
            return Decoded(np.asarray(tokens), np.asarray(layers), int(steps), 0.0, time.perf_counter() - start,
                           _ints(stats, len(ids)))
        rows = len(ids)
        devices = tuple(devices or ())[:rows]
        arguments = strategy.arguments()
        mesh = None
        if len(devices) > 1:
            mesh = Mesh(np.array(devices), ("data",))
            batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
            params = self._replicated(params, replicated)
            ids, mask = (jax.device_put(pad_rows(x, len(devices)), batch) for x in (ids, mask))
            arguments = jax.device_put(arguments, replicated)
        else:
            ids, mask = jnp.asarray(ids), jnp.asarray(mask)
        program, compile_seconds = self._program(params, strategy, search, ids, mask, cache_len, arguments, mesh)
        start = time.perf_counter()
        tokens, layers, steps, stats = jax.block_until_ready(program(params, ids, mask, *arguments))
        return Decoded(np.asarray(tokens)[:rows], np.asarray(layers)[:rows], int(steps), compile_seconds,
                       time.perf_counter() - start, _ints(stats, rows), devices=max(len(devices), 1))

    def _program(self, params, strategy, search, ids, mask, cache_len, arguments, mesh=None):
        devices = None if mesh is None else tuple(d.id for d in mesh.devices.flat)
        key = (strategy.program_key(), search, ids.shape, cache_len, _dtype(params), devices)
        if key in self._programs:
            self._programs.move_to_end(key)
            return self._programs[key], 0.0
        config = self.config

        def run(params, ids, mask, *arguments):
            state = prefill(params, config, search, ids, mask, cache_len)
            if mesh is not None:
                state = shard_rows(state, mesh)
            state, stats = _with_stats(strategy.decode(params, config, search, state, loop, *arguments))
            return search.best(state), search.best_layers(state), state.i, stats

        start = time.perf_counter()
        if mesh is None:
            program = jax.jit(run).lower(params, ids, mask, *arguments).compile()
        else:
            batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
            program = jax.jit(run, in_shardings=(replicated, batch, batch, *(replicated,) * len(arguments)))
            with jax.set_mesh(mesh):  # traced with the mesh known: the search's top-k runs per device
                program = program.lower(params, ids, mask, *arguments).compile()
        self._programs[key] = program
        while len(self._programs) > self.max_programs:
            self._programs.popitem(last=False)
        return program, time.perf_counter() - start

    def _replicated(self, params, sharding):
        """`params` on every device of `sharding`'s mesh, kept for the next call with the same
        weights and devices. A weight already on one of the devices is used there as it is, so
        each device holds one copy."""
        leaves = jax.tree.leaves(params)
        devices = tuple(sharding.mesh.devices.flat)
        cached = self._placed
        if cached is not None and cached[1] == devices and len(cached[2]) == len(leaves) \
                and all(ref() is leaf for ref, leaf in zip(cached[2], leaves)):
            return cached[3]

        def place(x):
            shards = [x if x.devices() == {d} else jax.device_put(x, d) for d in devices]
            return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)

        placed = jax.tree.map(place, params)
        token = object()  # names this entry; the callbacks must not hold the copies themselves
        self._placed = (token, devices, [weakref.ref(leaf) for leaf in leaves], placed)
        # The copies share the weights' buffers: once the model lets go of a weight (a new
        # layout, new weights), they go too, rather than keeping a second set alive.
        for leaf in leaves:
            weakref.finalize(leaf, self._forget, token)
        return placed

    def _forget(self, token) -> None:
        if self._placed is not None and self._placed[0] is token:
            self._placed = None

    def _eager(self, params, strategy, search, ids, mask, cache_len):
        config = self.config
        state = prefill(params, config, search, ids, mask, cache_len)
        if hasattr(strategy, "eager_decode"):  # a strategy of its own loop (speculative rounds)
            state, stats = strategy.eager_decode(params, config, search, state)
            return search.best(state), search.best_layers(state), state.i, stats
        while not bool(search.done(state)):
            t = int(state.i) - 1
            logits, cache, n = strategy.eager_step(params, config, search.last_tokens(state), state.cache, t,
                                                   search.live(state))
            state = search.update(state.replace(cache=cache), logits, n)
        return search.best(state), search.best_layers(state), state.i, {}


def _with_stats(out):
    """(state, stats) from what a strategy's `decode` returned: a state, or (state, stats)."""
    return out if isinstance(out, tuple) else (out, {})


def _ints(stats: dict, rows: int) -> dict:
    """A strategy's counts as ints: a () count as it is, a (rows,) count summed over the first
    `rows` rows (the real ones: padding rows would count twice)."""
    return {key: int(np.sum(np.asarray(value)[:rows]) if np.ndim(value) else value) for key, value in stats.items()}
