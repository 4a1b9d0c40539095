"""`generate`: prompts in, tokens out, under a layer-skip schedule or CALM.

The decoding itself is the model's decode engine (`hsd_jax.engine.Decoder`, owned by
the model): prefill, then one loop whose step follows the schedule, in one of three
modes that give the same tokens:

- ``compiled``: one jitted program; the schedule's op table (RUN / PROPAGATE / SKIP
  per step and layer) is an *argument*, and each layer is a `lax.switch` on its op,
  so any schedule of the same shape reuses the compiled program.
- ``static``: the schedule is baked in. Consecutive steps with the same ops form a
  segment, and each segment is its own `while_loop` containing only its layers: no
  per-layer conditionals at all (on GPU every `cond` costs a host sync).
- ``eager``: a plain Python loop over steps and layers, calling the same layer
  primitive op by op — the reference the compiled forms are checked against.

CALM is another step strategy of the same loop (`hsd_jax.calm.CalmSteps`), deciding
its exits at run time; `draft=` runs self-speculative greedy decoding
(`hsd_jax.speculative.SpeculativeSteps`), whose tokens are vanilla greedy's. This
module checks the inputs, pads the prompts, picks the strategy and turns the engine's
arrays into a `Generation`.

Several devices: `generate(..., devices=None)` splits the batch over every local device
(the engine shards it; `devices=N` the first N), with the same output as one device.
`iter_batches` cuts a long list of prompts into calls of `batch_size` prompts per device;
with `split_processes=True` and `jax.distributed` initialised, the processes share the
batches and process 0 receives them all, in input order (`hsd_jax.distributed`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
import warnings
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hsd_jax import distributed
from hsd_jax.calm import CalmSteps
from hsd_jax.data import require_utf8
from hsd_jax.engine import MODES, ScheduleSteps
from hsd_jax.errors import HsdError, positive_int
from hsd_jax.models import family
from hsd_jax.models.modules import CausalLM as LanguageModel
from hsd_jax.schedules import CalmConfig, Schedule, resolve
from hsd_jax.search import make_search
from hsd_jax.speculative import SpeculativeSteps

DEFAULT_MAX_NEW_TOKENS = 64
_DEFAULT = object()  # "the model's own EOS"; None means "never stop early"


@dataclasses.dataclass
class Generation:
    """What `generate` returns; one entry per input in each list."""

    sequences: list[list[int]]  # new tokens of the best beam, cut after the first EOS (kept)
    layers_per_token: list[list[int]]  # layers run to produce each of those tokens (floats with a draft:
    # a round's draft and verify layers spread over the tokens it emitted, docs/methods.md)
    texts: list[str] | None  # decoded `sequences`, when the model has a tokenizer
    schedule: str  # canonical spec of the schedule used
    mode: str
    num_beams: int
    compile_seconds: float  # 0.0 when the program came from the cache
    decode_seconds: float  # prefill + decode loop, compile excluded
    num_steps: int  # tokens generated per row before the batch stopped
    # Self-speculative decoding (`draft=`, hsd_jax.speculative): the draft's spec, k, and the
    # counts summed over rounds: rounds, drafted (k per live row and round), accepted (draft
    # tokens the verifier agreed with, per live row: the longest agreeing prefix), round_tokens
    # (tokens the rounds emitted per row). None without a draft.
    draft: str | None = None
    num_draft_tokens: int = 0
    draft_stats: dict[str, int] | None = None
    devices: int = 1  # devices the batch was split over (the most any batch used, over batches)

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens the verifier agreed with (each live row's longest
        agreeing prefix, over all rounds); nan without a draft."""
        s = self.draft_stats
        return s["accepted"] / s["drafted"] if s and s["drafted"] else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Tokens a speculative round emitted per row, on average (1 .. k + 1); nan without a draft."""
        s = self.draft_stats
        return s["round_tokens"] / s["rounds"] if s and s["rounds"] else float("nan")

    @property
    def avg_layers(self) -> float:
        """Avg. Layer (docs/methods.md): mean layers per generated token, over all inputs."""
        total = sum(len(s) for s in self.layers_per_token)
        return float(sum(map(sum, self.layers_per_token)) / total) if total else float("nan")

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def generate(
    lm: LanguageModel,
    input_ids: Sequence[Sequence[int]] | np.ndarray | None = None,
    prompts: Sequence[str] | str | None = None,
    *,
    attention_mask: np.ndarray | None = None,
    schedule: str | Schedule | CalmConfig | np.ndarray = "vanilla",
    num_beams: int = 1,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    mode: str = "compiled",
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_token_id: int | None | Any = _DEFAULT,
    pad_token_id: int | None = None,
    pad_to_multiple_of: int = 1,
    draft: str | Schedule | np.ndarray | None = None,
    num_draft_tokens: int | None = None,
    devices: int | None = None,
) -> Generation:
    """Decodes a batch of prompts under a layer-skip schedule.

    `input_ids` is a list of token lists (ragged is fine: rows are left-padded inside),
    or a padded array with its `attention_mask`; or `prompts`, strings for the model's
    tokenizer. `schedule` takes a spec
    ("vanilla", "hsd:s=1,min=0,max=20", "skipdecode:min=10,max=20", "calm:lambda=0.02",
    a preset name, a .npy path) or a `Schedule`. Greedy when `num_beams == 1`, else
    beam search; both match transformers' `generate(do_sample=False, ...)`.
    `pad_to_multiple_of` left-pads prompts to a multiple of that width, so batches of
    similar length share one compiled program (padding never changes the output).

    `draft` (a static schedule spec, preset, mask or `Schedule`) turns on lossless
    self-speculative greedy decoding (`hsd_jax.speculative`): each round drafts
    `num_draft_tokens` tokens (k, default DEFAULT_NUM_DRAFT_TOKENS) under the draft
    schedule and verifies them with one all-layer pass; the tokens are vanilla
    greedy's. `schedule` must then be vanilla and `num_beams` 1.

    `devices` is how many of this process's devices the batch is split over: None for
    all of them, 1 for one (at most one per prompt: 3 prompts use 3 of 8). The output is
    the same on any number; `Generation.devices` says how many were used. "eager" mode,
    the reference, runs on one device.
    """
    num_beams, max_new_tokens, pad_to_multiple_of = (positive_int(name, value) for name, value in (
        ("num_beams", num_beams), ("max_new_tokens", max_new_tokens), ("pad_to_multiple_of", pad_to_multiple_of)))
    num_draft_tokens = None if num_draft_tokens is None else positive_int("num_draft_tokens", num_draft_tokens)
    devices = None if devices is None else positive_int("devices", devices, "or None for all local devices")
    rows = _prompt_rows(lm, input_ids, prompts, attention_mask)
    if mode not in MODES:
        raise HsdError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    placed = _devices(devices)
    if mode == "eager" and devices is not None and devices > 1:
        raise HsdError(f"eager mode is the one-device reference and cannot split the batch over {devices} "
                       "devices; use mode 'compiled' or 'static', or devices=1")
    if num_beams > lm.config.vocab_size:  # each beam must be able to hold a different token
        raise HsdError(f"num_beams ({num_beams}) exceeds the model's vocabulary of {lm.config.vocab_size} tokens; "
                       "use fewer beams")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real) \
            or not math.isfinite(length_penalty):
        raise HsdError(f"length_penalty must be a finite number, got {length_penalty!r}")
    length_penalty = float(length_penalty)
    if early_stopping not in (True, False, "never"):
        raise HsdError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    config = lm.config
    eos = config.eos_token_id if eos_token_id is _DEFAULT else _token_id("eos_token_id", eos_token_id, config)
    pad = _token_id("pad_token_id", pad_token_id, config) if pad_token_id is not None else (
        config.pad_token_id if config.pad_token_id is not None else (eos if eos is not None else 0))
    ids, mask = _left_pad(rows, pad, pad_to_multiple_of, limit=config.max_position - max_new_tokens)
    cache_len = ids.shape[1] + max_new_tokens
    if family(config).learned_positions and cache_len > config.max_position:
        raise HsdError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {cache_len} exceeds "
                       f"the model's {config.max_position} positions; shorten the prompt or max_new_tokens")
    _check_memory(lm, ids.shape[0] * num_beams, ids.shape[1], max_new_tokens, placed)  # before a schedule's table
    sched = resolve(schedule, num_layers=config.num_layers, max_new_tokens=max_new_tokens)
    speculative = _draft(draft, num_draft_tokens, sched, num_beams, config.num_layers, max_new_tokens)
    mode = _static_or_compiled(sched, mode)
    search = make_search(num_beams=num_beams, max_new_tokens=max_new_tokens, eos_token_id=eos,
                         pad_token_id=pad, length_penalty=length_penalty, early_stopping=early_stopping)

    if speculative is not None:  # "static" runs the same program: the draft's row varies per round
        strategy = speculative
    elif isinstance(sched, CalmConfig):
        strategy = CalmSteps(sched, max_new_tokens, config.num_layers)
    else:
        strategy = ScheduleSteps(sched, static=mode == "static")
    start, converting = time.perf_counter(), lm.layout != "decode"
    params = lm.to_layout("decode").params  # once per model: the decode layout replaces the stacked weights
    layout_seconds = time.perf_counter() - start if converting else 0.0  # counted as compile time
    out = lm.decoder.decode(params, strategy, search, ids, mask, cache_len, mode, devices=placed)
    compile_seconds, decode_seconds = out.compile_seconds + layout_seconds, out.decode_seconds

    tokens, step_layers, steps = out.tokens, out.step_layers, out.steps
    sequences, layers = [], []
    for row, row_layers in zip(tokens, step_layers):  # each input's own record (CALM's rows exit apart)
        n = _length(row[:steps], eos)
        sequences.append(row[:n].tolist())
        record = row_layers[:n].tolist()
        # A draft's record is float32 (a round's layers over its tokens): rounded, so 34/3 reads 11.333333.
        layers.append(record if speculative is None else [round(x, 6) for x in record])
    texts = None
    if lm.tokenizer is not None:
        texts = [lm.tokenizer.decode(s, skip_special_tokens=True) for s in sequences]
    return Generation(sequences=sequences, layers_per_token=layers, texts=texts, schedule=sched.spec, mode=mode,
                      num_beams=num_beams, compile_seconds=compile_seconds, decode_seconds=decode_seconds,
                      num_steps=steps, draft=None if speculative is None else speculative.draft.spec,
                      num_draft_tokens=0 if speculative is None else speculative.num_draft_tokens,
                      draft_stats=None if speculative is None else out.stats,
                      devices=out.devices)


# k without num_draft_tokens. On the CPU measured, k = 1 did best (every k was slower than
# vanilla); with a verify pass as cheap as one step, as an accelerator's should be, the same
# acceptance makes k = 2 best (docs/performance.md, "Self-speculative decoding").
DEFAULT_NUM_DRAFT_TOKENS = 2


def _draft(draft, num_draft_tokens, sched, num_beams: int, num_layers: int, max_new_tokens: int):
    """The speculative strategy (`SpeculativeSteps`, which checks k), or None without a
    draft; an HsdError for a request speculative decoding cannot serve."""
    if draft is None:
        if num_draft_tokens is not None:
            raise HsdError("num_draft_tokens needs a draft schedule (draft=...); without one, decoding is not "
                           "speculative")
        return None
    if num_beams != 1:
        raise HsdError(f"speculative decoding (draft=...) is greedy only, but num_beams is {num_beams}; "
                       "use num_beams=1, or drop the draft")
    if not (isinstance(sched, Schedule) and sched.mask.all()):
        raise HsdError(f"with a draft, the output is vanilla greedy's: schedule must be vanilla, not "
                       f"{sched.spec!r} (the draft is the skipping schedule)")
    draft_sched = resolve(draft, num_layers=num_layers, max_new_tokens=max_new_tokens)
    if isinstance(draft_sched, CalmConfig):
        raise HsdError(f"the draft must be a static schedule (hsd:..., skipdecode:..., a preset or a mask), "
                       f"not CALM ({draft_sched.spec}): its exits are decided at run time")
    return SpeculativeSteps(draft_sched, DEFAULT_NUM_DRAFT_TOKENS if num_draft_tokens is None else num_draft_tokens)


def iter_batches(lm: LanguageModel, prompts: Sequence[str] | Sequence[Sequence[int]], *, batch_size: int = 8,
                 start: int = 0, desc: str = "generate", devices: int | None = None, split_processes: bool = False,
                 **options) -> Iterator[tuple[int, Generation]]:
    """`generate` over `prompts[start:]` in fixed-size batches, yielding each batch as it finishes.

    Yields (index of the batch's first prompt, its `Generation`, one entry per prompt
    of the batch), so a caller can save rows as they come; `start` skips prompts an
    earlier run already decoded. Every batch has the same number of rows (the last is
    filled up with copies of its final prompt; with fewer prompts than a batch, the
    batch is just those prompts) and a prompt width rounded up to a
    multiple of 32, so a long file compiles a handful of programs, not one per batch.
    Shows a progress bar.

    `batch_size` is prompts per device: a batch holds `batch_size` x devices prompts, split
    over the devices (`devices`, as in `generate`). Except where a row's output depends on
    the other rows of its batch (CALM's exit=batch rule, a draft's batch minimum:
    `rows_interact`): then a batch holds `batch_size` prompts, still split over the devices,
    so that the output is the same on any number of devices.

    `split_processes=True`, with `jax.distributed` initialised (several processes): the
    batches are dealt to the processes in turn, each decodes its own on its local
    devices (as many on every process: the fewest any has, or `devices`), and process 0
    yields every batch in input order (the others' received from them); the other
    processes yield nothing (`hsd_jax.distributed`).
    """
    from hsd_jax.progress import progress

    batch_size = positive_int("batch_size", batch_size)
    if devices is not None:
        devices = positive_int("devices", devices, "or None for all local devices")
    prompts = list(prompts)
    if not prompts:
        raise HsdError("no prompts given")
    split = split_processes and distributed.process_count() > 1
    if options.get("mode") == "eager" and devices is None:
        count = 1  # the reference runs on one device
    else:
        count = distributed.shared_device_count(devices) if split else len(distributed.local_devices(devices))
    if not rows_interact(lm, options):
        batch_size *= count
    # Every prompt is encoded and checked before the first batch: a prompt too long for the
    # model, found at batch 900 of 1000, would cost the decoding of the 899 before it first.
    key = "prompts" if isinstance(prompts[0], str) else "input_ids"
    if start < len(prompts):
        rest = {"input_ids": None, "prompts": None, key: prompts[start:]}
        _check_fit(lm, _prompt_rows(lm, **rest), start, options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    # Fewer prompts than a batch: the batch shrinks to them, rather than decoding copies of
    # the last prompt (3 prompts with --batch-size 2000 decoded 2000 rows).
    batch_size = max(1, min(batch_size, len(prompts) - start))
    starts = range(start, len(prompts), batch_size)

    def decode(first: int) -> Generation:
        batch = prompts[first:first + batch_size]
        filled = batch + [batch[-1]] * (batch_size - len(batch))
        out = generate(lm, **{key: filled}, pad_to_multiple_of=32, devices=count, **options)
        n = len(batch)
        return dataclasses.replace(
            out, sequences=out.sequences[:n], layers_per_token=out.layers_per_token[:n],
            texts=None if out.texts is None else out.texts[:n])

    if split:
        yield from distributed.split_batches(list(starts), decode, dataclasses.asdict, lambda d: Generation(**d),
                                             desc=desc)
        return
    for first in progress(starts, desc=desc, unit="batch", disable=None if len(starts) > 1 else True):
        yield first, decode(first)


def rows_interact(lm: LanguageModel, options: dict) -> bool:
    """Whether a row's output under these `generate` options depends on the other rows of
    its batch: CALM with exit=batch (one exit decision per step for the batch) and a draft
    (the batch keeps the drafts every row agreed with, so a row's layers depend on the
    others; its tokens do not). Options `generate` would refuse say False: it says why."""
    if options.get("draft") is not None:
        return True
    try:
        sched = resolve(options.get("schedule", "vanilla"), num_layers=lm.config.num_layers,
                        max_new_tokens=options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    except (HsdError, TypeError, ValueError):
        return False
    return isinstance(sched, CalmConfig) and sched.exit == "batch"


def _check_fit(lm: LanguageModel, rows: list[list[int]], start: int, max_new_tokens) -> None:
    """The first of `rows` (the prompts from number `start` on) that GPT-2's learned positions
    cannot hold with `max_new_tokens` after it, as an HsdError counting prompts from 1."""
    limit = lm.config.max_position
    if not family(lm.config).learned_positions:
        return  # rotary positions have no table to run past
    max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
    for i, row in enumerate(rows, start + 1):
        if len(row) + max_new_tokens > limit:
            raise HsdError(f"prompt {i} of {start + len(rows)} is {len(row)} tokens, and with max_new_tokens "
                           f"{max_new_tokens} that exceeds the model's {limit} positions; shorten it or lower "
                           "max_new_tokens (nothing was decoded)")


def generate_batched(lm: LanguageModel, prompts: Sequence[str] | Sequence[Sequence[int]], *, batch_size: int = 8,
                     desc: str = "generate", **options) -> Generation | None:
    """`generate` over many prompts (strings or token lists) in fixed-size batches
    (see `iter_batches`, whose options it takes), gathered into one `Generation`. With
    `split_processes=True` over several processes, None on every process but 0."""
    parts = [out for _, out in iter_batches(lm, prompts, batch_size=batch_size, desc=desc, **options)]
    if not parts:  # another process's batches: process 0 has them
        return None
    first = parts[0]
    return Generation(
        sequences=[s for out in parts for s in out.sequences],
        layers_per_token=[s for out in parts for s in out.layers_per_token],
        texts=None if first.texts is None else [t for out in parts for t in out.texts],
        schedule=first.schedule, mode=first.mode, num_beams=first.num_beams,
        compile_seconds=sum(out.compile_seconds for out in parts),
        decode_seconds=sum(out.decode_seconds for out in parts),
        num_steps=max(out.num_steps for out in parts),
        draft=first.draft, num_draft_tokens=first.num_draft_tokens,
        draft_stats=None if first.draft_stats is None
        else {key: sum(out.draft_stats[key] for out in parts) for key in first.draft_stats},
        devices=max(out.devices for out in parts),
    )


def _check_memory(lm: LanguageModel, rows: int, prompt_len: int, max_new_tokens: int, devices: list) -> None:
    """Refuses a batch whose weights and KV cache cannot fit one device, before anything is
    allocated: a model without a position limit (Phi's rotary positions) takes any
    max_new_tokens, and a cache past the memory ends in the system's out-of-memory kill,
    without a word. Each device holds the weights and its share of the rows."""
    from hsd_jax.platform import device_memory

    limit = device_memory(devices[0])
    if limit is None:
        return
    config, leaves = lm.config, jax.tree.leaves(lm.params)
    weights = sum(x.size * x.dtype.itemsize for x in leaves)
    per_position = 2 * config.num_layers * config.num_heads * config.head_dim * leaves[0].dtype.itemsize
    device_rows = -(-rows // len(devices))
    needed = weights + device_rows * per_position * (prompt_len + max_new_tokens)
    if needed <= limit:
        return
    fit = (limit - weights) // (device_rows * per_position) - prompt_len
    advice = f"at most about {fit} new tokens fit this batch" if fit >= 1 else "even one new token does not fit"
    kind = devices[0].platform.upper()
    raise HsdError(f"max_new_tokens={max_new_tokens} with {rows} row{'s' if rows > 1 else ''} of {prompt_len} prompt "
                   f"tokens needs {_gib(needed)} on a {kind} device (the weights and the KV cache), more than its "
                   f"{_gib(limit)}; {advice}: lower max_new_tokens, the batch size or the beams")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _token_id(name: str, value, config) -> int | None:
    """`value` as a token id of the model's vocabulary (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise HsdError(f"{name} must be one token id (an integer) or None, got {value!r}")
    if not 0 <= value < config.vocab_size:
        raise HsdError(f"{name} {value} is outside the model's vocabulary of {config.vocab_size} tokens "
                       f"(ids 0 to {config.vocab_size - 1}); pass an id of this model's tokenizer")
    return int(value)


def _devices(devices: int | None) -> list:
    """The devices to split over (`distributed.local_devices`); a JAX_PLATFORMS that this JAX
    cannot serve is an HsdError saying how to fix it, not JAX's bare AssertionError."""
    from hsd_jax.platform import explained

    with explained():
        return distributed.local_devices(devices)


# Static mode compiles one decode loop per segment of the schedule, so its compile time
# and memory grow with the segments: a random 128x4 mask (~104 segments) took 65 s and
# 1.6 GB to compile against 7.9 s for the compiled program. At about 16 segments the
# two compile times meet, and every preset has at most 15 (formula schedules one per
# value of their layer window), so above it static falls back to compiled.
STATIC_MAX_SEGMENTS = 16


def _static_or_compiled(sched, mode: str) -> str:
    """The mode to run: `mode`, except static for a schedule of too many segments."""
    if mode != "static" or isinstance(sched, CalmConfig):
        return mode
    segments = len(sched.segments())
    if segments <= STATIC_MAX_SEGMENTS:
        return mode
    warnings.warn(f"{sched.name}: {segments} segments are too many for static mode (at most "
                  f"{STATIC_MAX_SEGMENTS}; it compiles a loop per segment), so it runs in compiled mode, "
                  "with the same tokens", stacklevel=3)
    return "compiled"


def _length(row: np.ndarray, eos: int | None) -> int:
    """Tokens up to and including the first EOS (all of them if none)."""
    if eos is not None:
        hits = np.flatnonzero(row == eos)
        if hits.size:
            return int(hits[0]) + 1
    return len(row)


def _prompt_rows(lm: LanguageModel, input_ids, prompts, attention_mask=None) -> list[list[int]]:
    if (input_ids is None) == (prompts is None):
        raise HsdError("pass exactly one of input_ids (token lists) or prompts (strings)")
    if prompts is not None:
        if isinstance(prompts, str):
            prompts = [prompts]
        for i, p in enumerate(prompts):
            if not isinstance(p, str):  # e.g. token ids: the tokenizer's own error would not say so
                kind = "token ids" if isinstance(p, (list, tuple, np.ndarray)) else type(p).__name__
                raise HsdError(f"prompts takes strings, but prompt {i} is {kind} ({p!r:.40}); pass token "
                               "lists as input_ids=[[...], ...] instead")
        if lm.tokenizer is None:
            raise HsdError(f"{lm.source or 'this model'} has no tokenizer; pass input_ids instead of prompts, "
                           "or load a folder with tokenizer files")
        for i, p in enumerate(prompts):
            require_utf8(p, f"prompt {i}")
        rows = [lm.tokenizer.encode(p) for p in prompts]
    elif attention_mask is not None:  # a padded array: keep each row's real tokens
        ids, keep = _token_array(input_ids, "input_ids"), np.asarray(attention_mask)
        if keep.shape != ids.shape:
            raise HsdError(f"attention_mask has shape {keep.shape} but input_ids {ids.shape}; they must match")
        rows = [r[m.astype(bool)].tolist() for r, m in zip(ids, keep)]
    else:
        first = input_ids[0] if len(input_ids) else None
        if isinstance(input_ids, (str, bytes)) or isinstance(first, numbers.Number) \
                or getattr(first, "ndim", None) == 0:  # e.g. [1, 2, 3]: one prompt, not a batch
            raise HsdError("input_ids takes a batch: a list of token lists, one per prompt (e.g. [[1, 2, 3]] "
                           "for one prompt)")
        rows = [_token_array(r, f"prompt {i}").tolist() for i, r in enumerate(input_ids)]
    if not rows:
        raise HsdError("no prompts given")
    for i, r in enumerate(rows):
        if not r:
            raise HsdError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in r if not 0 <= t < lm.config.vocab_size]
        if bad:
            raise HsdError(f"prompt {i} has token ids outside the vocabulary [0, {lm.config.vocab_size}): {bad[:5]}")
    return rows


def _token_array(ids, what: str) -> np.ndarray:
    """`ids` as an integer array; floats (7.5 would become 7), bools and text are refused,
    as is a row that is not flat. An empty row stays empty (its caller says so)."""
    try:
        array = np.asarray(ids)
    except ValueError:  # ragged rows inside one prompt
        raise HsdError(f"{what} is not a flat list of token ids") from None
    if array.size == 0:
        return array.astype(np.int64).reshape(array.shape)
    if array.dtype.kind not in "iu":
        flat = array.reshape(-1)
        # The first value that is not a whole number (7.5, not the 3.0 before it; None, not the 1).
        whole = [isinstance(x, numbers.Integral) or isinstance(x, float) and x.is_integer() for x in flat.tolist()]
        sample = flat[whole.index(False) if False in whole else 0]
        sample = sample.item() if isinstance(sample, np.generic) else sample
        raise HsdError(f"{what} holds {type(sample).__name__} values (e.g. {sample!r:.40}), not integer token ids; "
                       "pass integers "
                       "(e.g. tokenizer output, or np.asarray(ids, dtype=int) if they are whole numbers)")
    if array.ndim != (2 if what == "input_ids" else 1):
        raise HsdError(f"{what} has shape {array.shape}; give one flat list of token ids per prompt")
    return array


def _left_pad(rows: list[list[int]], pad: int, multiple: int = 1, limit: int | None = None):
    """(ids, mask) arrays, left-padded to the longest row rounded up to `multiple`
    (but not past `limit`, the widest prompt that still fits the positions)."""
    longest = max(map(len, rows))
    width = -(-longest // multiple) * multiple
    if limit is not None:
        width = max(longest, min(width, limit))
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = True
    return ids, mask
