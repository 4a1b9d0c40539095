"""Lossless self-speculative decoding: a layer-skip schedule drafts, all layers verify.

Beyond the paper. Every method of the paper trades quality for speed; here the
skipped-layer model only *proposes* tokens and the full model checks them, so the
output is exactly vanilla greedy decoding's (as in Draft & Verify and LayerSkip; the
draft here is any static schedule: HSD, SkipDecode, a mask). docs/methods.md,
"Self-speculative decoding (beyond the paper)", states the method and its rules.

A round, for a batch whose last generated token `y` is not yet in the KV cache:

1. **Draft** k tokens d_0 .. d_{k-1}, one decode step each under the draft schedule
   (`hsd_jax.engine.schedule_step`: the step that produces token i + j runs the
   schedule's row i - 1 + j, clamped to its last row; skipped layers' K/V by state
   propagation, as in plain HSD decoding). The draft's K/V go into the cache slots
   after `y`'s.
2. **Roll back** the draft's slots (`valid` false, `index` back to the round's start)
   and **verify**: one all-layer pass over the k + 1 tokens [y, d_0 .. d_{k-1}]
   (`verify`: the decode step's layers over k + 1 positions, as k + 1 rows per
   product or layer by layer over one-row products, whichever the hardware runs
   faster), which writes the full model's K/V over those slots. Its argmax at position j,
   v_j, is what vanilla greedy would emit after [.., y, d_0 .. d_{j-1}].
3. **Accept** the longest prefix where d_j == v_j (a_b of k, per row) and the
   verifier's own next token: the round emits v_0 .. v_a. Rows of a batch share one
   cache index, so the batch takes the **minimum** a over its live rows (a row that
   finished before the round, or whose EOS falls inside its agreeing prefix, does not
   limit the others). The cache keeps the slots of y, d_0 .. d_{a-1} — the verify
   pass's exact K/V — and the rest are rolled back.

Every emitted token is a verifier argmax given vanilla's own prefix, so the tokens are
vanilla greedy's; EOS and the `max_new_tokens` cut apply token by token, as in
`hsd_jax.search.Greedy`. The rounds run in one `while_loop` of the compiled program
(the draft a `fori_loop` of k steps), with the draft's op table an argument, so any
draft schedule of the same shape and k reuses the program.

Layers per token (the rule, docs/methods.md): a round costs its k draft steps' layers
(RUN ones, as Avg. Layer counts) plus L for the verify pass (one pass over the
weights, at k + 1 positions), spread evenly over the tokens the round emitted.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from hsd_jax.engine import schedule_step
from hsd_jax.errors import HsdError, positive_int
from hsd_jax.models import RUN, KVCache, ModelConfig, context, decode_step, family, run_layers
from hsd_jax.models.common import Context
from hsd_jax.schedules import Schedule

# What a run records, summed over its rounds (`Generation.draft_stats`).
STAT_KEYS = ("rounds", "drafted", "accepted", "round_tokens")
VERIFY_FORMS = ("rows", "positions")


def default_verify_form(rows: int) -> str:
    """The verify pass's form (`verify`) for a batch of `rows` where none is given:
    "positions" on CPU at batch 1, where it measured faster (over 2-5 positions: 2.0-3.5
    one-token steps against 3.1-3.4 on the CommonGen model; 1.2-2.7 against 2.2-2.8 over
    2-4 positions on the demo's, where the two are even from 4 on); "rows" otherwise: from
    2 rows on, a decode step's products have several rows anyway and the positions form
    only multiplies their number (batch 8: 1.5-2.9 steps against 1.1-1.5); on an
    accelerator one kernel per operation is what counts.
    docs/performance.md, "Self-speculative decoding", has the measurements."""
    return "positions" if jax.default_backend() == "cpu" and rows == 1 else "rows"


def verify(params, config: ModelConfig, tokens, cache: KVCache, form: str = "rows"):
    """All layers over (B, T) tokens at the cache's next T slots: (B, T, V) float32 logits,
    and the cache with their K/V written at [index, index + T) and advanced.

    Two forms of the same pass, one read of the weights for T positions:

    - "rows": the decode step's code (`run_layers`, every layer RUN, baked in) over T
      positions at once, so each matrix product has B x T rows. One kernel per operation:
      what a GPU wants.
    - "positions": layer by layer, each position a one-token block (`family.block`, as a
      decode step runs it) attending to the cache and to the positions before it, whose
      K/V the same layer has just written. Every product is then the single-row product
      of a decode step, and a layer's weights, read from memory by the first position,
      are still in the CPU's cache for the others. On XLA's CPU backend a product of 2 to
      8 rows costs 1.5-5x its single-row product (docs/performance.md, "Self-speculative
      decoding"), which makes the "rows" pass cost 2-3.4 one-token steps at batch 1.
    """
    if form == "rows":
        fam = family(config)
        new_mask = jnp.ones(tokens.shape, bool)
        ctx = context(cache, new_mask)
        h = fam.embed(params, tokens, ctx.positions, config)
        h, cache = run_layers(params, config, h, ctx, cache, (RUN,) * config.num_layers)
        return fam.head(params, h, config), cache.advance(new_mask)
    if form != "positions":
        raise HsdError(f"verify form {form!r} is unknown; use one of {', '.join(VERIFY_FORMS)}")
    return _verify_positions(params, config, tokens, cache)


def _verify_positions(params, config: ModelConfig, tokens, cache: KVCache):
    fam = family(config)
    rows, width = tokens.shape
    start = cache.index
    seen = jnp.sum(cache.valid, axis=1, keepdims=True).astype(jnp.int32)  # (B, 1) real tokens before
    one = jnp.ones((rows, 1), bool)
    ctxs, hs = [], []
    for j in range(width):  # position j sees the cache and this pass's positions 0 .. j-1
        earlier = jnp.broadcast_to(jnp.arange(width) < j, (rows, width))
        ctx = Context(positions=seen + j, new_valid=one,
                      cache_valid=jax.lax.dynamic_update_slice(cache.valid, earlier, (0, start)))
        ctxs.append(ctx)
        hs.append(fam.embed(params, tokens[:, j:j + 1], ctx.positions, config))
    for layer, p in enumerate(params["layers"]):
        # Layer by layer: the first position waits for the last one's previous layer (0 x a value of
        # it: exact), else XLA may run each position through every layer in turn, and the weights
        # would be read from memory once per position.
        hs[0] = hs[0] + 0 * hs[-1][:, :, :1]
        for j in range(width):
            def block(h, cache_k, cache_v, p=p, ctx=ctxs[j]):
                return fam.block(p, h, ctx, config, cache_k, cache_v)

            # The block inside a conditional (always true, but XLA cannot know): the write below
            # consumes the conditional's outputs, so it comes after the block's read of the buffer
            # and XLA writes in place. Written directly, each write copied the layer's buffer
            # twice (XLA could not order the read first; a `0 x h` dependency did not help).
            hs[j], k, v = jax.lax.cond(start >= 0, block, block, hs[j], cache.k[layer], cache.v[layer])
            cache = cache.replace(index=start + j).write_layer(layer, k, v)
    cache = cache.replace(index=start)
    logits = jnp.concatenate([fam.head(params, h, config) for h in hs], axis=1)  # single-row products too
    return logits, cache.advance(jnp.ones(tokens.shape, bool))


def rewind(cache: KVCache, start, keep, width: int) -> KVCache:
    """The cache with slots [start, start + width) valid only below start + `keep` (the
    batch's shared count), and `index` at start + keep: what a round keeps of its slots."""
    slots = jnp.broadcast_to(jnp.arange(width) < keep, (cache.valid.shape[0], width))
    valid = jax.lax.dynamic_update_slice(cache.valid, slots, (0, start))
    return cache.replace(valid=valid, index=jnp.asarray(start + keep, jnp.int32))


def accept(drafts, verified, finished, eos: int | None, k: int):
    """The round's decision, traced.

    drafts (B, k) and verified (B, k + 1) int32 tokens, finished (B,) bool before the
    round. Returns (agreed (B,) int32: the longest prefix where the draft equals the
    verifier, first_eos (B,): the first position whose verified token is EOS, k + 1 if
    none, and m (): the drafts the whole batch keeps, the minimum over rows that still
    need them)."""
    agreed = jnp.sum(jnp.cumprod(drafts == verified[:, :k], axis=1), axis=1).astype(jnp.int32)
    if eos is None:
        first_eos = jnp.full(finished.shape, k + 1, jnp.int32)
    else:
        hit = verified == eos
        first_eos = jnp.where(jnp.any(hit, axis=1), jnp.argmax(hit, axis=1), k + 1).astype(jnp.int32)
    # A finished row, or one whose output ends at or before its last agreed token, needs no more.
    settled = finished | (first_eos <= agreed)
    m = jnp.min(jnp.where(settled, k, agreed))
    return agreed, first_eos, m


def speculative_decode(params, config: ModelConfig, search, state, ops, k: int, form: str = "rows"):
    """Every round after the prefill, in one `while_loop` (traced).

    `search` is a `hsd_jax.search.Greedy`, `state` its state after the prefill, `ops`
    the draft's (N, L) op table (traced), `form` the verify pass's (`verify`). Returns
    (state, stats); the state's `layers` record is float32 (a round's layers spread over
    its tokens). The cache must hold k slots more than vanilla needs (the last round's
    draft and verify may reach past the last token kept).
    """
    n, num_layers, pad = search.max_new_tokens, config.num_layers, search.pad_token_id
    batch = state.tokens.shape[0]
    width = n + k + 1  # a round writes k + 1 tokens at i <= n - 1
    # drafted and accepted are counted per row: the engine sums them over the real rows (the
    # rows that pad a batch split over devices copy a real one and would count it twice).
    stats = {key: jnp.zeros((batch,) if key in ("drafted", "accepted") else (), jnp.int32) for key in STAT_KEYS}
    draft_step = schedule_step(config, lambda t: ops[t])
    position = jnp.arange(k + 1)

    def body(carry):
        state, stats = carry
        i, start, finished = state.i, state.cache.index, state.finished
        last = jax.lax.dynamic_slice_in_dim(state.tokens, i - 1, 1, axis=1)[:, 0]

        def draft(j, c):
            tok, cache, drafts, ran = c
            logits, cache, used = draft_step(params, tok, cache, jnp.minimum(i - 1 + j, n - 1), ~finished)
            tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return tok, cache, jax.lax.dynamic_update_slice(drafts, tok[:, None], (0, j)), ran + used

        zero = jnp.zeros((), jnp.int32)
        _, cache, drafts, ran = jax.lax.fori_loop(
            0, k, draft, (last, state.cache, jnp.zeros((batch, k), jnp.int32), zero))
        cache = rewind(cache, start, 0, k)
        logits, cache = verify(params, config, jnp.concatenate([last[:, None], drafts], axis=1), cache, form)
        verified = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # (B, k + 1)
        agreed, first_eos, m = accept(drafts, verified, finished, search.eos_token_id, k)
        c = jnp.minimum(m + 1, n - i)  # tokens this round emits
        emit = jnp.where(finished[:, None] | (position[None] > first_eos[:, None]) | (position[None] >= c),
                         pad, verified)
        cache = rewind(cache, start, c, k + 1)
        cost = jnp.where(position < c, (ran + num_layers).astype(jnp.float32) / c, 0.0)
        live = ~finished
        stats = {
            "rounds": stats["rounds"] + 1,
            "drafted": stats["drafted"] + k * live,
            "accepted": stats["accepted"] + jnp.where(live, agreed, 0),
            "round_tokens": stats["round_tokens"] + c,
        }
        state = state.replace(
            tokens=jax.lax.dynamic_update_slice(state.tokens, emit, (0, i)),
            layers=jax.lax.dynamic_update_slice(state.layers, jnp.broadcast_to(cost, (batch, k + 1)), (0, i)),
            finished=finished | (first_eos < c), i=i + c, cache=cache)
        return state, stats

    wide = state.replace(
        tokens=jnp.full((batch, width), pad, jnp.int32).at[:, :n].set(state.tokens),
        layers=jnp.zeros((batch, width), jnp.float32).at[:, :n].set(state.layers.astype(jnp.float32)))
    wide, stats = jax.lax.while_loop(lambda carry: ~search.done(carry[0]), body, (wide, stats))
    return wide.replace(tokens=wide.tokens[:, :n], layers=wide.layers[:, :n]), stats


@dataclasses.dataclass(frozen=True)
class SpeculativeSteps:
    """Self-speculative greedy decoding as a strategy of the decode engine
    (`hsd_jax.engine.Strategy`): it runs its own loop over rounds (`decode` ignores the
    engine's step loop) and returns (state, stats), its counts beside the search state.

    The program is keyed by k, the verify form and the draft's op-table shape (the batch
    shape, which picks the default form, is in the engine's key); the table itself is an
    argument. `extra_cache_slots` (= k) is what the engine adds to the cache length.
    """

    draft: Schedule
    num_draft_tokens: int
    verify_form: str | None = None  # `verify`'s form; None: `default_verify_form(rows)`

    def __post_init__(self):
        object.__setattr__(self, "num_draft_tokens", positive_int("num_draft_tokens", self.num_draft_tokens))
        if self.verify_form not in (None, *VERIFY_FORMS):
            raise HsdError(f"verify form {self.verify_form!r} is unknown; use one of {', '.join(VERIFY_FORMS)}")

    def form(self, rows: int) -> str:
        return self.verify_form or default_verify_form(rows)

    @property
    def extra_cache_slots(self) -> int:
        return self.num_draft_tokens

    def program_key(self):
        return ("speculative", self.num_draft_tokens, self.verify_form, self.draft.layer_ops().shape)

    def arguments(self) -> tuple:
        return (jnp.asarray(self.draft.layer_ops(), jnp.int32),)

    def decode(self, params, config, search, state, loop, ops):
        _check_greedy(search)
        form = self.form(state.tokens.shape[0])
        return speculative_decode(params, config, search, state, ops, self.num_draft_tokens, form)

    def eager_step(self, params, config, tokens, cache, t, live):
        raise HsdError("speculative decoding runs whole rounds, not single steps; the engine calls eager_decode")

    def eager_decode(self, params, config, search, state):
        """The reference: rounds in Python, each layer op by op, the acceptance decided on
        the host row by row. Returns (state, stats), as `decode`."""
        _check_greedy(search)
        k, n, num_layers = self.num_draft_tokens, search.max_new_tokens, config.num_layers
        eos, pad = search.eos_token_id, search.pad_token_id
        table = self.draft.layer_ops()
        rows = state.tokens.shape[0]
        tokens = np.full((rows, n + k + 1), pad, np.int32)
        tokens[:, :n] = np.asarray(state.tokens)
        layers = np.zeros((rows, n + k + 1), np.float32)
        layers[:, :n] = np.asarray(state.layers)
        finished = np.array(state.finished)
        i, cache = int(state.i), state.cache
        stats = dict.fromkeys(STAT_KEYS, 0)
        while not (finished.all() or i >= n):
            start = int(cache.index)
            last = tokens[:, i - 1].copy()
            tok, drafts, ran = jnp.asarray(last), [], 0
            for j in range(k):
                ops = tuple(int(op) for op in table[min(i - 1 + j, n - 1)])
                logits, cache = decode_step(params, config, tok, cache, ops)
                tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
                drafts.append(np.asarray(tok))
                ran += ops.count(RUN)
            drafts = np.stack(drafts, axis=1)
            cache = rewind(cache, start, 0, k)
            logits, cache = verify(params, config, jnp.asarray(np.concatenate([last[:, None], drafts], 1)), cache,
                                   self.form(rows))
            verified = np.asarray(jnp.argmax(logits, axis=-1))
            keep = k
            for b in range(rows):
                agreed = 0
                while agreed < k and drafts[b, agreed] == verified[b, agreed]:
                    agreed += 1
                if not finished[b]:
                    stats["drafted"] += k
                    stats["accepted"] += agreed
                    if not (eos is not None and eos in verified[b, :agreed + 1].tolist()):
                        keep = min(keep, agreed)
            count = min(keep + 1, n - i)
            for j in range(count):
                for b in range(rows):
                    if finished[b]:
                        tokens[b, i + j] = pad
                    else:
                        tokens[b, i + j] = verified[b, j]
                        finished[b] = eos is not None and verified[b, j] == eos
                layers[:, i + j] = np.float32(ran + num_layers) / np.float32(count)
            cache = rewind(cache, start, count, k + 1)
            stats["rounds"] += 1
            stats["round_tokens"] += count
            i += count
        state = state.replace(tokens=jnp.asarray(tokens[:, :n]), layers=jnp.asarray(layers[:, :n]),
                              finished=jnp.asarray(finished), i=jnp.asarray(i, jnp.int32), cache=cache)
        return state, stats


def _check_greedy(search) -> None:
    if search.num_beams != 1:
        raise HsdError("speculative decoding (draft=...) is greedy only; use num_beams=1, or drop the draft")
