"""Layer-skip schedules: which layers each decode step runs.

A schedule is a boolean mask `[max_new_tokens, num_layers]`; row `t` is decode
step `t` (the pass that consumes generated token `y_t`, see docs/methods.md) and
`mask[t, l]` says whether that step runs layer `l`. The prefill always runs
every layer and is not part of the mask.

Specs (text a user types, or what a preset file holds):

    vanilla                                      every layer, every step
    skipdecode:min=10,max=20[,T=72][,warmup=1]   SkipDecode (Del Corro et al.)
    hsd:s=1,min=0,max=20[,T=72][,warmup=0]       Hierarchical Skip Decoding
    calm:lambda=0.02[,tau=4][,min_exit=1][,measure=softmax|state][,every=1][,exit=row|batch]
                                                 CALM, decided at run time
    path/to/mask.npy  (or mask:path/to/mask.npy) any user mask, bool or 0/1
    hsd-s1-20, path/to/preset.json               a preset (see `schedules/`)

Pure numpy: the decoder turns a `Schedule` into JAX programs elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from fractions import Fraction
from pathlib import Path

import numpy as np

from hsd_jax.errors import HsdError

# What `Schedule.layer_ops()` says a step does with a layer.
RUN = 0  # run the whole layer
PROPAGATE = 1  # skip it, but fill its KV cache from the passing hidden state (a later step reads it)
SKIP = 2  # skip it; nothing later reads its KV entry at this position

# Keys each method's spec accepts: key -> (type, default). REQUIRED keys have no
# default; T defaults to max_new_tokens (a choice the paper leaves open, docs/methods.md).
REQUIRED, STEPS = "required", "max_new_tokens"
_KEYS = {
    "vanilla": {},
    "skipdecode": {"min": (int, REQUIRED), "max": (int, REQUIRED), "T": (int, STEPS), "warmup": (int, 1)},
    "hsd": {"s": (int, REQUIRED), "min": (int, REQUIRED), "max": (int, REQUIRED), "T": (int, STEPS), "warmup": (int, 0)},
    "calm": {"lambda": (float, REQUIRED), "tau": (float, 4.0), "min_exit": (int, 1), "measure": (str, "softmax"),
             "every": (int, 1), "exit": (str, "row")},
}
METHODS = tuple(_KEYS)

# Repo-root folder that ships as the package `hsd_jax.presets` (see pyproject.toml).
_SOURCE_PRESETS = Path(__file__).resolve().parent.parent / "schedules"


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """A static layer-skip schedule; build one with `schedule(spec, ...)`."""

    mask: np.ndarray = dataclasses.field(repr=False)  # (max_new_tokens, num_layers) bool, read-only
    spec: str  # canonical spec text, e.g. "hsd:s=1,min=0,max=20,T=72,warmup=0"
    name: str  # short label for tables and plots, e.g. "HSD(s=1, 0-20)"

    def __post_init__(self):
        mask = _as_bool_mask(self.mask, source=self.name or "mask")
        if mask.shape[0] < 1 or mask.shape[1] < 1:
            raise HsdError(f"{self.name}: schedule mask has shape {mask.shape}; it needs at least one step and one layer")
        empty = np.flatnonzero(~mask.any(axis=1))
        if empty.size:
            steps = ", ".join(map(str, empty[:5])) + (", ..." if empty.size > 5 else "")
            which = f"step {steps} runs" if empty.size == 1 else f"steps {steps} run"
            raise HsdError(
                f"{self.name}: decode {which} no layer; every step must run at least one layer "
                "(raise min or warmup, or fix the mask)"
            )
        mask = mask.copy()
        mask.flags.writeable = False  # the cached properties below rely on it never changing
        object.__setattr__(self, "mask", mask)

    @property
    def max_new_tokens(self) -> int:
        return self.mask.shape[0]

    @property
    def num_layers(self) -> int:
        return self.mask.shape[1]

    @functools.cached_property
    def layers_per_step(self) -> np.ndarray:
        """(T,) int: number of layers each step runs."""
        return _read_only(self.mask.sum(axis=1))

    @property
    def avg_layers(self) -> float:
        """Nominal mean number of layers run per decode step, over all rows."""
        return float(self.layers_per_step.mean())

    @functools.cached_property
    def needs_kv(self) -> np.ndarray:
        """(T, L) bool: step t skips layer l, yet a later step runs l and so reads its KV entry at t."""
        # runs_from[t, l] = some step >= t runs l (a reversed cumulative OR).
        runs_from = np.logical_or.accumulate(self.mask[::-1], axis=0)[::-1]
        runs_later = np.zeros_like(self.mask)
        runs_later[:-1] = runs_from[1:]
        return _read_only(~self.mask & runs_later)

    @property
    def is_nested(self) -> bool:
        """Every step runs a subset of the previous step's layers (then no KV entry is ever missing)."""
        return not bool((self.mask[1:] & ~self.mask[:-1]).any())

    @functools.cached_property
    def _ops(self) -> np.ndarray:
        ops = np.full(self.mask.shape, SKIP, dtype=np.int8)
        ops[self.needs_kv] = PROPAGATE
        ops[self.mask] = RUN
        return _read_only(ops)

    def layer_ops(self) -> np.ndarray:
        """(T, L) int8: RUN (0), PROPAGATE (1, KV only) or SKIP (2) per step and layer."""
        return self._ops

    def segments(self) -> list[tuple[int, int, np.ndarray]]:
        """Maximal runs of steps that treat every layer alike, as (start, stop, ops_row).

        `ops_row` is the (L,) int8 `layer_ops()` row shared by steps start..stop-1;
        a static decoder compiles one straight-line program per distinct row.
        """
        ops = self._ops
        changes = np.flatnonzero((ops[1:] != ops[:-1]).any(axis=1)) + 1
        bounds = [0, *changes.tolist(), len(ops)]
        return [(start, stop, ops[start]) for start, stop in zip(bounds[:-1], bounds[1:])]

    def truncate(self, max_new_tokens: int) -> Schedule:
        """The first `max_new_tokens` rows (a mask must cover every step, so never more)."""
        if max_new_tokens > self.max_new_tokens:
            raise HsdError(
                f"{self.name}: the schedule covers {self.max_new_tokens} decode steps but "
                f"{max_new_tokens} were asked for; give a mask with at least {max_new_tokens} rows "
                "or lower max_new_tokens"
            )
        if max_new_tokens == self.max_new_tokens:
            return self
        return Schedule(self.mask[:max_new_tokens], spec=self.spec, name=self.name)


CALM_MEASURES = ("softmax", "state")  # softmax response (the paper's), hidden-state saturation
CALM_EXITS = ("row", "batch")  # each row exits at its own layer; or one decision per step (t5x)


@dataclasses.dataclass(frozen=True)
class CalmConfig:
    """CALM early exit (docs/methods.md): decided at run time, so it has no mask.

    measure: the confidence an exit test compares with the step's threshold: "softmax"
    (top-1 minus top-2 probability of the LM head at the tested layer, the paper's
    default) or "state" (cosine similarity of the hidden state before and after the
    layer: no LM head). every: test after layers min_exit, min_exit + every, ... only.
    exit: "row" (each row, i.e. each beam of each input, exits at its own layer) or
    "batch" (the step exits for every row once all live rows are confident, as CALM's
    t5x code does).
    """

    lam: float  # the paper's lambda; the threshold decays towards 0.9 * lam
    tau: float = 4.0  # decay rate of the threshold over the decode steps (our default; docs/methods.md)
    min_exit: int = 1  # the first exit test comes after this many layers (1 = after layer 0)
    measure: str = "softmax"
    every: int = 1
    exit: str = "row"

    def __post_init__(self):
        if not self.lam >= 0:  # also catches NaN
            raise HsdError(f"calm: lambda must be >= 0, got {self.lam}")
        if not self.tau >= 0:
            raise HsdError(f"calm: tau must be >= 0, got {self.tau}")
        if self.min_exit < 1:
            raise HsdError(f"calm: min_exit must be >= 1 (a step runs at least one layer), got {self.min_exit}")
        if self.measure not in CALM_MEASURES:
            raise HsdError(f"calm: measure must be softmax (softmax response, the paper's) or state (hidden-state "
                           f"saturation), got {self.measure!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise HsdError(f"calm: every must be an integer >= 1 (test after every k-th layer), got {self.every!r}")
        if self.exit not in CALM_EXITS:
            raise HsdError(f"calm: exit must be row (each sequence exits at its own layer) or batch (one exit per "
                           f"step for the whole batch, as t5x), got {self.exit!r}")

    @property
    def spec(self) -> str:
        """Canonical spec: lambda, tau and min_exit always; the other keys only when not default."""
        extra = "".join(f",{key}={getattr(self, key)}" for key, default in (("measure", "softmax"), ("every", 1),
                                                                            ("exit", "row"))
                        if getattr(self, key) != default)
        return f"calm:lambda={self.lam:g},tau={self.tau:g},min_exit={self.min_exit}{extra}"

    @property
    def name(self) -> str:
        extra = "".join(f", {text}" for text, shown in (("state", self.measure == "state"),
                                                        (f"every={self.every}", self.every != 1),
                                                        ("exit=batch", self.exit == "batch")) if shown)
        return f"CALM(lambda={self.lam:g}{extra})"

    def threshold(self, t, max_new_tokens: int):
        """Exit threshold at decode step t: clip(0.9 lam + 0.1 exp(-tau t / N), 0, 1) for softmax
        (the paper's: from 0.9 lam + 0.1 at t = 0 down towards 0.9 lam), and for state
        clip(lam + 0.1 (1 - lam) exp(-tau t / N), 0, 1): the same value at t = 0, down
        towards lam itself (docs/methods.md: similarities sit within 0.05 of 1, where the
        paper's floor 0.1 lam below lam would let every layer exit)."""
        decay = np.exp(-self.tau * np.asarray(t) / max_new_tokens)
        if self.measure == "state":
            return np.clip(self.lam + 0.1 * (1.0 - self.lam) * decay, 0.0, 1.0)
        return np.clip(0.9 * self.lam + 0.1 * decay, 0.0, 1.0)

    def thresholds(self, max_new_tokens: int) -> np.ndarray:
        """(N,) float32: the threshold of every decode step, to hand to a compiled loop."""
        return self.threshold(np.arange(max_new_tokens), max_new_tokens).astype(np.float32)


def schedule(spec, *, num_layers: int, max_new_tokens: int) -> Schedule:
    """Build the static schedule a spec describes, with exactly `max_new_tokens` rows.

    `spec` is a spec string, a preset name, a `.npy` mask or `.json` preset path, a
    bool (or 0/1) array `[rows, num_layers]`, or a `Schedule`. Formula schedules
    have one row per step (steps past T keep h(T)); a mask must have at least
    `max_new_tokens` rows and is cut to that many.
    """
    _check_sizes(num_layers, max_new_tokens)
    if isinstance(spec, CalmConfig):
        raise _calm_has_no_mask(spec.spec)
    if isinstance(spec, Schedule):
        if spec.num_layers != num_layers:
            raise HsdError(f"{spec.name}: the schedule is for {spec.num_layers} layers but the model has {num_layers}")
        # A formula schedule can be rebuilt longer from its spec; a mask cannot.
        if spec.max_new_tokens < max_new_tokens and spec.spec.partition(":")[0] in _KEYS:
            return schedule(spec.spec, num_layers=num_layers, max_new_tokens=max_new_tokens)
        return spec.truncate(max_new_tokens)
    if isinstance(spec, np.ndarray):
        return _from_mask(spec, spec="array", name="array", num_layers=num_layers, max_new_tokens=max_new_tokens)
    if isinstance(spec, Path):
        spec = str(spec)
    if not isinstance(spec, str):
        raise HsdError(f"a schedule spec must be a string, a bool array or a Schedule, not {type(spec).__name__}")

    spec = _preset_spec(spec)
    if spec.startswith("mask:") or spec.endswith(".npy"):
        path = spec.removeprefix("mask:")
        return _from_mask(
            _load_mask(path), spec=f"mask:{path}", name=f"mask({Path(path).name})",
            num_layers=num_layers, max_new_tokens=max_new_tokens,
        )
    method, values = _parse(spec)
    if method == "calm":
        raise _calm_has_no_mask(spec)
    return _formula(method, values, num_layers=num_layers, max_new_tokens=max_new_tokens)


def resolve(spec, *, num_layers: int, max_new_tokens: int) -> Schedule | CalmConfig:
    """Like `schedule()`, but a CALM spec (or preset) gives its `CalmConfig` instead."""
    _check_sizes(num_layers, max_new_tokens)
    if isinstance(spec, (str, Path)):
        text = _preset_spec(str(spec))
        if text.partition(":")[0].strip() == "calm":
            _, values = _parse(text)
            spec = CalmConfig(lam=values["lambda"], tau=values["tau"], min_exit=values["min_exit"],
                              measure=values["measure"], every=values["every"], exit=values["exit"])
    if isinstance(spec, CalmConfig):
        if spec.min_exit > num_layers:
            raise HsdError(f"calm: min_exit={spec.min_exit} is more than the model's {num_layers} layers")
        return spec
    return schedule(spec, num_layers=num_layers, max_new_tokens=max_new_tokens)


# --- presets ---------------------------------------------------------------


def list_presets() -> dict[str, str]:
    """Preset name -> spec, from the JSON files in the repo's `schedules/` folder."""
    return {name: info["spec"] for name, info in preset_infos().items()}


@functools.cache
def preset_infos() -> dict[str, dict]:
    """Preset name -> the whole preset file (spec, description, paper_avg_layers)."""
    return {path.name.removesuffix(".json"): _read_preset(path) for path in _preset_files()}


def _preset_files():
    try:
        from importlib.resources import files

        folder = files("hsd_jax.presets")
    except ModuleNotFoundError:  # running from a source tree that was never installed
        folder = _SOURCE_PRESETS
    return sorted((p for p in folder.iterdir() if p.name.endswith(".json")), key=lambda p: p.name)


def _read_preset(path) -> dict:
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise HsdError(f"cannot read the preset file {path}: {err}") from None
    if not isinstance(info, dict) or not isinstance(info.get("spec"), str):
        raise HsdError(f'preset file {path} must hold a JSON object with a "spec" string')
    return info


def _preset_spec(spec: str) -> str:
    """The spec a preset name or preset file stands for; any other text unchanged."""
    spec = spec.strip()
    if spec.endswith(".json"):
        if not Path(spec).is_file():
            raise HsdError(f"preset file {spec} does not exist")
        return _read_preset(Path(spec))["spec"]
    return preset_infos().get(spec, {"spec": spec})["spec"]


# --- the paper's rows --------------------------------------------------------

# The paper's eleven table rows, in its order: vanilla, CALM x2, SkipDecode x2, HSD x6.
PAPER_PRESETS = ("vanilla", "calm-0.02", "calm-0.005", "skipdecode-10-20", "skipdecode-10-24", "hsd-s1-20",
                 "hsd-s2-20", "hsd-s1-14", "hsd-s2-14", "hsd-s1-10", "hsd-s2-10")
# The paper ran the same layer counts on GPT-2 large (36 layers) and Phi-2 (32); a
# shallower model gets them scaled by num_layers / PAPER_MIN_DEPTH.
PAPER_MIN_DEPTH = 32
# Named groups of rows that `paper_specs` expands (the CLI's `--schedules paper`).
PAPER_GROUPS = {
    "paper": "the paper's 11 rows, scaled below 32 layers",
    "paper-hsd-warmup": "the paper's 6 HSD rows with layer 0 always run (warmup=1), scaled alike",
}


def paper_specs(group: str, num_layers: int) -> list[str]:
    """The specs of a `PAPER_GROUPS` group for a model of `num_layers` layers.

    At 32 layers or more the rows are exactly the paper's presets. Below, each
    SkipDecode / HSD layer count (min, max) becomes round_half_up(count * L / 32),
    keeping its fraction of the depth; s, T, warm-up and CALM's thresholds stay.
    """
    if group not in PAPER_GROUPS:
        raise HsdError(f"unknown row group {group!r}; use one of {', '.join(PAPER_GROUPS)}")
    factor = min(Fraction(num_layers, PAPER_MIN_DEPTH), Fraction(1))
    names = PAPER_PRESETS if group == "paper" else [n for n in PAPER_PRESETS if n.startswith("hsd-")]
    specs = []
    for name in names:
        spec = _preset_spec(name)
        method, values = _parse(spec)
        if method in ("skipdecode", "hsd"):
            values = {**values, "min": _round_half_up(values["min"] * factor),
                      "max": _round_half_up(values["max"] * factor)}
            if group == "paper-hsd-warmup":
                values["warmup"] = 1
            spec = _format_spec(method, values)
        specs.append(spec)
    return specs


def expand_groups(specs, num_layers: int) -> list:
    """`specs` with each `PAPER_GROUPS` name replaced by its rows for this depth; a group's
    row that scaling made equal to an earlier row (e.g. both SkipDecode rows at 4 layers)
    is left out."""
    rows: list = []
    for spec in specs:
        if isinstance(spec, str) and spec in PAPER_GROUPS:
            for row in paper_specs(spec, num_layers):
                if row not in rows:
                    rows.append(row)
        else:
            rows.append(spec)
    return rows


def _round_half_up(x: Fraction) -> int:
    return int(x + Fraction(1, 2))


def _format_spec(method: str, values: dict) -> str:
    keys = [k for k in _KEYS[method] if values[k] is not STEPS]
    return f"{method}:" + ",".join(f"{k}={values[k]:g}" if isinstance(values[k], float) else f"{k}={values[k]}"
                                   for k in keys)


# --- formula schedules -------------------------------------------------------


def _parse(spec: str) -> tuple[str, dict]:
    """Split 'method:key=value,...' into the method and every key's value (defaults filled in)."""
    method, _, body = spec.partition(":")
    method = method.strip()
    if method not in _KEYS:
        raise HsdError(
            f"unknown schedule {spec!r}; use one of the methods {', '.join(METHODS)} "
            f"(e.g. 'hsd:s=1,min=0,max=20'), a preset ({', '.join(list_presets())}) or a .npy mask file"
        )
    allowed = _KEYS[method]
    values = {key: default for key, (_, default) in allowed.items()}
    given = set()
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq or not key:
            raise HsdError(f"{spec!r}: expected key=value, got {item!r}")
        if key not in allowed:
            keys = ", ".join(allowed) if allowed else "none"
            raise HsdError(f"{spec!r}: unknown key {key!r} for {method}; allowed keys: {keys}")
        if key in given:
            raise HsdError(f"{spec!r}: key {key!r} is given twice")
        given.add(key)
        values[key] = _number(value, allowed[key][0], where=f"{spec!r}: {key}")
    missing = [key for key, value in values.items() if value is REQUIRED]
    if missing:
        raise HsdError(f"{spec!r}: {method} needs {', '.join(missing)} (e.g. 'hsd:s=1,min=0,max=20')")
    return method, values


def _number(text: str, kind: type, *, where: str):
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        raise HsdError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def _formula(method: str, v: dict, *, num_layers: int, max_new_tokens: int) -> Schedule:
    L, N = num_layers, max_new_tokens
    if method == "vanilla":
        return Schedule(np.ones((N, L), dtype=bool), spec="vanilla", name="Vanilla")

    T = N if v["T"] is STEPS else v["T"]
    s, h_min, h_max, w = v.get("s", 0), v["min"], v["max"], v["warmup"]
    checks = [
        (s >= 0, f"s={s} must be >= 0"),
        (h_min >= 0, f"min={h_min} must be >= 0"),
        (h_min <= h_max, f"min={h_min} must not exceed max={h_max}"),
        (h_max <= L, f"max={h_max} must not exceed the model's {L} layers"),
        (w >= 0, f"warmup={w} must be >= 0"),
        (w <= L, f"warmup={w} must not exceed the model's {L} layers"),
        (T >= 1, f"T={T} must be >= 1"),
    ]
    for ok, problem in checks:
        if not ok:
            raise HsdError(f"{method}: {problem}")

    layers = np.arange(L)
    # Kept lower layers: 1-based layer i when i mod (s+1) == 0 (paper Eq. 5). SkipDecode keeps none.
    kept_below = (layers + 1) % (s + 1) == 0 if method == "hsd" else np.zeros(L, dtype=bool)
    mask = np.empty((N, L), dtype=bool)
    for t in range(N):
        h = _budget(t, h_min, h_max, T)
        mask[t] = (layers < w) | (layers >= L - h) | kept_below
    spec = f"{method}:{f's={s},' if method == 'hsd' else ''}min={h_min},max={h_max},T={T},warmup={w}"
    label = f"HSD(s={s}, {h_min}-{h_max}" if method == "hsd" else f"SkipDecode({h_min}-{h_max}"
    default_w = _KEYS[method]["warmup"][1]
    name = label + (f", w={w})" if w != default_w else ")")
    return Schedule(mask, spec=spec, name=name)


def _budget(t: int, h_min: int, h_max: int, T: int) -> int:
    """h(t) = round(h_max - (h_max - h_min) * min(t, T) / T): upper layers run at step t.

    Exact rational arithmetic, and round() halves to even (Python's and numpy's
    rule): with it SkipDecode(10, 20) and (10, 24) at T=72 average 16.07 and 18.10
    layers and the six HSD settings match the paper's table; rounding halves up
    gives 16.08 and 18.11 instead.
    """
    return round(Fraction(h_max) - Fraction((h_max - h_min) * min(t, T), T))


# --- user masks -------------------------------------------------------------


def _load_mask(path: str) -> np.ndarray:
    if not Path(path).is_file():
        raise HsdError(f"mask file {path} does not exist; give a .npy file holding a bool [steps, layers] array")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise HsdError(f"cannot read the mask file {path} as a .npy array: {err}") from None


def _from_mask(array, *, spec: str, name: str, num_layers: int, max_new_tokens: int) -> Schedule:
    mask = _as_bool_mask(array, source=name)
    rows, width = mask.shape
    if width != num_layers:
        raise HsdError(f"{name}: the mask has {width} columns but the model has {num_layers} layers; give one column per layer")
    if rows < max_new_tokens:
        raise HsdError(
            f"{name}: the mask has {rows} rows but {max_new_tokens} decode steps were asked for; "
            f"a mask needs one row per step (give at least {max_new_tokens} rows or lower max_new_tokens)"
        )
    return Schedule(mask[:max_new_tokens], spec=spec, name=name)


def _as_bool_mask(array, *, source: str) -> np.ndarray:
    """A 2-D bool array from a bool or 0/1 integer one; an HsdError for anything else."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise HsdError(f"{source}: a schedule mask must be 2-D [steps, layers], got shape {array.shape}")
    if array.dtype == bool:
        return array
    if np.issubdtype(array.dtype, np.integer):
        if np.isin(array, (0, 1)).all():
            return array.astype(bool)
        wrong = ~np.isin(array, (0, 1))
        step, layer = np.argwhere(wrong)[0]
        values = ", ".join(map(str, sorted(set(array[wrong].tolist()))[:5]))
        raise HsdError(f"{source}: a mask of integers must hold only 0 and 1, but it holds {values} (the first at "
                       f"step {step}, layer {layer}); write 1 for a layer run and 0 for a layer skipped")
    raise HsdError(f"{source}: the mask must be boolean (or 0/1 integers), got dtype {array.dtype}; save it with .astype(bool)")


# --- small helpers ------------------------------------------------------------


def _check_sizes(num_layers: int, max_new_tokens: int):
    if num_layers < 1:
        raise HsdError(f"num_layers must be >= 1, got {num_layers}")
    if max_new_tokens < 1:
        raise HsdError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def _calm_has_no_mask(spec: str) -> HsdError:
    return HsdError(
        f"{spec!r}: CALM decides its exit layer at run time, so it has no static mask; "
        "use hsd_jax.schedules.resolve() to get its CalmConfig"
    )


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array
