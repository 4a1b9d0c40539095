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
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Hashable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

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
        search state, or (state, stats): a dict of () arrays the strategy counts
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


@dataclasses.dataclass
class Decoded:
    tokens: np.ndarray  # (B, N) best sequence of each input
    step_layers: np.ndarray  # (B, N) layers run for each of `tokens`
    steps: int  # tokens generated per row before the batch stopped
    compile_seconds: float  # 0.0 when the program came from the cache
    decode_seconds: float
    stats: dict = dataclasses.field(default_factory=dict)  # a strategy's own counts (ints), if it keeps any


class Decoder:
    """Runs prefill + decode loop for one model config, and owns the compiled programs.

    `max_programs` bounds the cache (least recently used goes first): a long
    evaluation over many schedules and batch shapes keeps the recent ones.
    """

    def __init__(self, config: ModelConfig, max_programs: int = 32):
        self.config = config
        self.max_programs = max_programs
        self._programs: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._programs)

    def decode(self, params, strategy: Strategy, search, ids, mask, cache_len: int, mode: str = "compiled") -> Decoded:
        """Decodes (B, T) left-padded `ids` / `mask`; `params` in the decode layout."""
        ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)
        cache_len += getattr(strategy, "extra_cache_slots", 0)
        if mode == "eager":
            start = time.perf_counter()
            tokens, layers, steps, stats = self._eager(params, strategy, search, ids, mask, cache_len)
            return Decoded(np.asarray(tokens), np.asarray(layers), int(steps), 0.0, time.perf_counter() - start,
                           _ints(stats))
        arguments = strategy.arguments()
        program, compile_seconds = self._program(params, strategy, search, ids, mask, cache_len, arguments)
        start = time.perf_counter()
        tokens, layers, steps, stats = jax.block_until_ready(program(params, ids, mask, *arguments))
        return Decoded(np.asarray(tokens), np.asarray(layers), int(steps), compile_seconds,
                       time.perf_counter() - start, _ints(stats))

    def _program(self, params, strategy, search, ids, mask, cache_len, arguments):
        key = (strategy.program_key(), search, ids.shape, cache_len, _dtype(params))
        if key in self._programs:
            self._programs.move_to_end(key)
            return self._programs[key], 0.0
        config = self.config

        def run(params, ids, mask, *arguments):
            state = prefill(params, config, search, ids, mask, cache_len)
            state, stats = _with_stats(strategy.decode(params, config, search, state, loop, *arguments))
            return search.best(state), search.best_layers(state), state.i, stats

        start = time.perf_counter()
        program = jax.jit(run).lower(params, ids, mask, *arguments).compile()
        self._programs[key] = program
        while len(self._programs) > self.max_programs:
            self._programs.popitem(last=False)
        return program, time.perf_counter() - start

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


def _ints(stats: dict) -> dict:
    return {key: int(value) for key, value in stats.items()}
