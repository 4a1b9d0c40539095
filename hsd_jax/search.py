"""Greedy and beam search, each written once, with transformers' semantics.

A search sees only logits: `update(state, logits, layers)` picks the next token of
every row and returns the new state (reordering the KV cache it carries, for beams).
The decode loop (`hsd_jax.engine`) decides which layers produce those logits, so the
same search serves vanilla, SkipDecode, HSD, CALM and every execution mode.

`layers` is how many layers each row ran to produce its logits: () for the whole batch
(a schedule), or (R,) per row (CALM, whose rows exit at their own layers). The state
keeps it with each row's tokens, so a beam's record follows the beam through reorders
(token i of a hypothesis is made by its parent beam's row, with that row's layers) and
a finished hypothesis keeps its own; `best_layers` gives the record of `best`'s tokens.

Token i of the output is chosen by update number i (update 0 reads the prefill
logits); `state.i` counts updates done, i.e. tokens generated so far.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from hsd_jax.models import KVCache

_NEG = -1.0e9  # transformers' "impossible" score; kept identical so ties break the same way


@struct.dataclass
class GreedyState:
    tokens: jax.Array  # (B, N) int32, generated tokens; pad after a row finished
    layers: jax.Array  # (B, N) int32, layers run to make each token
    finished: jax.Array  # (B,) bool
    i: jax.Array  # () int32, tokens generated so far
    cache: KVCache  # rows = B


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Argmax decoding; a finished row keeps emitting `pad_token_id` (as transformers does)."""

    max_new_tokens: int
    eos_token_id: int | None
    pad_token_id: int
    num_beams: int = 1  # rows per input

    def init(self, cache: KVCache, batch: int) -> GreedyState:
        return GreedyState(
            tokens=jnp.full((batch, self.max_new_tokens), self.pad_token_id, jnp.int32),
            layers=jnp.zeros((batch, self.max_new_tokens), jnp.int32),
            finished=jnp.zeros((batch,), bool),
            i=jnp.zeros((), jnp.int32),
            cache=cache,
        )

    def update(self, state: GreedyState, logits: jax.Array, layers) -> GreedyState:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # (B,)
        tok = jnp.where(state.finished, self.pad_token_id, tok)
        finished = state.finished
        if self.eos_token_id is not None:
            finished = finished | (tok == self.eos_token_id)
        tokens = jax.lax.dynamic_update_slice(state.tokens, tok[:, None], (0, state.i))
        made = jnp.broadcast_to(jnp.asarray(layers, jnp.int32), tok.shape)
        layers = jax.lax.dynamic_update_slice(state.layers, made[:, None], (0, state.i))
        return state.replace(tokens=tokens, layers=layers, finished=finished, i=state.i + 1)

    def last_tokens(self, state: GreedyState) -> jax.Array:
        return jax.lax.dynamic_slice_in_dim(state.tokens, state.i - 1, 1, axis=1)[:, 0]

    def done(self, state: GreedyState) -> jax.Array:
        return jnp.all(state.finished) | (state.i >= self.max_new_tokens)

    def live(self, state: GreedyState) -> jax.Array:
        """(B,) bool: rows whose next token can still change the output (not finished)."""
        return ~state.finished

    def best(self, state: GreedyState) -> jax.Array:
        """(B, N) tokens of each input."""
        return state.tokens

    def best_layers(self, state: GreedyState) -> jax.Array:
        """(B, N) layers run for each of `best`'s tokens."""
        return state.layers


@struct.dataclass
class BeamState:
    running: jax.Array  # (B, K, N) int32, live hypotheses
    running_layers: jax.Array  # (B, K, N) int32, layers run to make each of their tokens
    running_scores: jax.Array  # (B, K) f32, summed log-probs
    finished: jax.Array  # (B, K, N) int32, best completed hypotheses, best first
    finished_layers: jax.Array  # (B, K, N) int32, their layers record
    finished_scores: jax.Array  # (B, K) f32, length-penalised
    finished_flag: jax.Array  # (B, K) bool, slot holds a completed hypothesis
    improvable: jax.Array  # (B,) bool, a live beam may still beat the worst finished one
    all_hit_stop: jax.Array  # () bool, every candidate of the last update ended
    i: jax.Array  # () int32, tokens generated so far
    cache: KVCache  # rows = B * K, beam-major within an input


@dataclasses.dataclass(frozen=True)
class BeamSearch:
    """transformers' vectorised beam search (`GenerationMixin._beam_search`), in JAX.

    Each update keeps the 2K best continuations: those ending (EOS, or the length
    limit) may enter the finished set, the best K others keep running. The stopping
    heuristic and `early_stopping` values (True, False, "never") follow transformers.
    """

    num_beams: int
    max_new_tokens: int
    eos_token_id: int | None
    pad_token_id: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def init(self, cache: KVCache, batch: int) -> BeamState:
        """`cache` holds each of the `batch` prompts once; every beam gets a copy."""
        k, n, b = self.num_beams, self.max_new_tokens, batch
        filled = jnp.full((b, k, n), self.pad_token_id, jnp.int32)
        zeros = jnp.zeros((b, k, n), jnp.int32)
        # Only beam 0 starts live, so the first update does not pick K copies of one token.
        scores = jnp.zeros((b, k), jnp.float32).at[:, 1:].set(_NEG)
        return BeamState(
            running=filled, running_layers=zeros, running_scores=scores, finished=filled, finished_layers=zeros,
            finished_scores=jnp.full((b, k), _NEG, jnp.float32), finished_flag=jnp.zeros((b, k), bool),
            improvable=jnp.ones((b,), bool), all_hit_stop=jnp.zeros((), bool),
            i=jnp.zeros((), jnp.int32), cache=cache.track_beams(k),
        )

    def update(self, s: BeamState, logits: jax.Array, layers) -> BeamState:
        b, k, n = s.running.shape
        vocab = logits.shape[-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, vocab)
        logp = (logp + s.running_scores[:, :, None]).reshape(b, k * vocab)

        # Top 2K continuations over all beams of an input.
        top_lp, top_idx = _top_k(logp, 2 * k)  # (B, 2K)
        parent, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        cand = jnp.take_along_axis(s.running, parent[:, :, None], axis=1)  # (B, 2K, N)
        cand = jax.lax.dynamic_update_slice(cand, tok[:, :, None], (0, 0, s.i))
        # A candidate's new token was made by its parent beam's row, with that row's layers.
        made = jnp.take_along_axis(jnp.broadcast_to(jnp.asarray(layers, jnp.int32), (b * k,)).reshape(b, k),
                                   parent, axis=1)  # (B, 2K)
        cand_layers = jnp.take_along_axis(s.running_layers, parent[:, :, None], axis=1)
        cand_layers = jax.lax.dynamic_update_slice(cand_layers, made[:, :, None], (0, 0, s.i))
        hits = jnp.broadcast_to(s.i + 1 >= n, tok.shape)
        if self.eos_token_id is not None:
            hits = hits | (tok == self.eos_token_id)

        # The K best candidates that did not end keep running.
        run_lp = top_lp + hits * _NEG
        _, keep = _top_k(run_lp, k)
        running = jnp.take_along_axis(cand, keep[:, :, None], axis=1)
        running_layers = jnp.take_along_axis(cand_layers, keep[:, :, None], axis=1)
        running_scores = jnp.take_along_axis(run_lp, keep, axis=1)
        parents = jnp.take_along_axis(parent, keep, axis=1)  # (B, K) beam each survivor continues

        # Ended candidates among the first K may replace worse finished hypotheses.
        fin_lp = top_lp / ((s.i + 1).astype(jnp.float32) ** self.length_penalty)
        if self.early_stopping is True:
            fin_lp += jnp.all(s.finished_flag, axis=1, keepdims=True) * _NEG
        fin_lp += (~s.improvable)[:, None] * _NEG
        just_ended = hits & (jnp.arange(2 * k) < k)[None, :]
        fin_lp += (~just_ended) * _NEG
        merged_scores = jnp.concatenate([s.finished_scores, fin_lp], axis=1)
        merged_flag = jnp.concatenate([s.finished_flag, just_ended], axis=1)
        merged = jnp.concatenate([s.finished, cand], axis=1)
        _, best = _top_k(merged_scores, k)
        finished = jnp.take_along_axis(merged, best[:, :, None], axis=1)
        merged_layers = jnp.concatenate([s.finished_layers, cand_layers], axis=1)
        finished_layers = jnp.take_along_axis(merged_layers, best[:, :, None], axis=1)
        finished_scores = jnp.take_along_axis(merged_scores, best, axis=1)
        finished_flag = jnp.take_along_axis(merged_flag, best, axis=1)

        i = s.i + 1
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_len = jnp.float32(n)
        else:
            best_len = i.astype(jnp.float32)
        best_possible = running_scores[:, :1] / best_len ** self.length_penalty
        worst = jnp.where(finished_flag, jnp.min(finished_scores, axis=1, keepdims=True), _NEG)
        improvable = s.improvable & jnp.any(best_possible > worst, axis=1)
        return BeamState(
            running=running, running_layers=running_layers, running_scores=running_scores, finished=finished,
            finished_layers=finished_layers, finished_scores=finished_scores, finished_flag=finished_flag, improvable=improvable,
            all_hit_stop=jnp.all(hits), i=i, cache=s.cache.reorder(parents),
        )

    def last_tokens(self, s: BeamState) -> jax.Array:
        b, k, _ = s.running.shape
        return jax.lax.dynamic_slice_in_dim(s.running, s.i - 1, 1, axis=2).reshape(b * k)

    def live(self, s: BeamState) -> jax.Array:
        """(B * K,) bool: every beam row; all K beams keep running, as in transformers."""
        return jnp.ones(s.running.shape[:2], bool).reshape(-1)

    def done(self, s: BeamState) -> jax.Array:
        stop = ~jnp.any(s.improvable) | s.all_hit_stop | (s.i >= self.max_new_tokens)
        if self.early_stopping is True:
            stop = stop | jnp.all(s.finished_flag)
        return stop

    def best(self, s: BeamState) -> jax.Array:
        """(B, N) tokens of each input's best finished hypothesis."""
        return s.finished[:, 0]

    def best_layers(self, s: BeamState) -> jax.Array:
        """(B, N) layers run for each of `best`'s tokens (its own beams' rows, step by step)."""
        return s.finished_layers[:, 0]


def _top_k(x: jax.Array, k: int):
    """`jax.lax.top_k` of each row of (B, n) `x`, on the devices that hold the row: in a
    program split by rows over a "data" mesh (`hsd_jax.engine`, traced under `jax.set_mesh`),
    XLA would otherwise gather the whole batch onto every device for its TopK at every step
    (it does not split a TopK by rows)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "data" not in mesh.axis_names:
        return jax.lax.top_k(x, k)
    rows = jax.sharding.PartitionSpec("data")
    return jax.shard_map(lambda x: jax.lax.top_k(x, k), in_specs=rows, out_specs=rows)(x)


def make_search(*, num_beams: int, max_new_tokens: int, eos_token_id: int | None, pad_token_id: int,
                length_penalty: float = 1.0, early_stopping: bool | str = False):
    if num_beams == 1:
        return Greedy(max_new_tokens, eos_token_id, pad_token_id)
    return BeamSearch(num_beams, max_new_tokens, eos_token_id, pad_token_id, float(length_penalty),
                      early_stopping)
