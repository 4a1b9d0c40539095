"""Running a suite: its cases in order (`run_suite`, with the machine's `environment`), its
targets as figures (`check_targets`, `target_figures`), and the suites themselves
(`load_suites`; `build_cases` makes a suite's cases of each kind).

Every result carries the definitions below (`run_suite` copies them from here).

Definitions (docs/benchmarks.md restates them):

- tokens/s = inputs x new tokens / wall seconds of one `generate` call (prefill +
  decode; compile excluded; hsd-jax calls go through the public `generate`).
- weight bytes of a decode step = the LM head (final norm, output matrix and bias)
  plus, per layer, all its weights if the step runs it, its input norm and K/V
  projections if it only propagates K/V, nothing if it skips it. Embedding rows and
  the KV cache are not counted. The prefill reads every weight once and produces
  token 0; step t produces token t + 1, so N new tokens read
  prefill + steps 0 .. N-2.
- ideal speedup of a schedule = weight bytes of the N tokens under vanilla / under
  the schedule (the speedup if time were weight bytes over a fixed bandwidth).
- memory roofline = inputs x bandwidth / vanilla weight bytes per token, with the
  bandwidth measured in the same run (the best median of a matrix-vector product and
  a reduction over an array about the size of the weights).
- ms/step = wall seconds of one call / new tokens (the prefill's share included).
- fraction of HBM peak (GPU) = (weight bytes + KV cache bytes) per step / ms per step /
  the device's peak HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s); the KV bytes
  are K and V of the layers the step runs at every position it attends to (prompt +
  t + 1 at step t, their mean over the tokens), per row.
- transformers (dynamic cache) and transformers-static (`cache_implementation=
  "static"`, which transformers compiles on CUDA by itself): `generate` with EOS off;
  on a GPU with its own random weights in the same dtype. Its first call's seconds
  are reported as its compile seconds.
- CALM runs (compiled mode): Avg. Layer and weight bytes from the layers each row
  ran; `calm_depth` picks the state-measure lambda nearest that fraction of the depth.
- the devices run (runner "devices") = compiled vanilla on all N local devices, each
  device the case's batch (N x batch inputs per call, the same prompts N times); its
  speedup = its inputs per second / compiled vanilla's on one device.

The suites (`hsd-jax bench --suite NAME`) are data in `hsd_jax.bench.suites`; a
suite's targets are printed as figures against their target values, and the checks
that must hold are tests (tests/test_bench.py), not verdicts of this package.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import time
from typing import Callable, Sequence

from hsd_jax.bench.calm import CalmCase
from hsd_jax.bench.common import ARCHS, TINY, apply_threads, busy_machine_note, model_config, other_load
from hsd_jax.bench.schedules import RUNNERS, Case, run_case
from hsd_jax.bench.speculative import SpeculativeCase
from hsd_jax.errors import HsdError


def environment() -> dict:
    """The machine and the versions a result came from: device, driver (nvidia-smi, where
    present), jax, jaxlib, torch, transformers, Python, and the load average."""
    import subprocess

    import jax
    import jaxlib

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind), "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__, torch_threads=torch.get_num_threads(),
                    torch_cuda=torch.version.cuda if torch.cuda.is_available() else None)
    except ImportError:
        pass
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def run_suite(cases: Sequence[Case], repeats: int, json_path=None, log: Callable[[str], None] = print,
              suite: str = "custom", max_seconds: float | None = None, targets: Sequence[dict] = (),
              threads: int | None = None) -> dict:
    """Runs the cases in order, rewriting `json_path` (atomically) after each one.

    `threads` (None: every CPU the process may use) is given to XLA's CPU backend and to
    PyTorch alike (`apply_threads`). Other processes' load is measured before and after
    each case (`other_load`); a case where it left fewer free cores than the threads gets an
    UNRELIABLE note. With `max_seconds`, a case is skipped (and listed) when it would end
    after that: its `estimate_seconds` (a suite's `case_seconds`) scaled by how long the
    finished cases took against theirs; without one, once the time has passed.
    `targets` (a suite's, see `hsd_jax.bench.suites`) are reported as figures against
    their target values under the result's "targets"."""
    from hsd_jax.io import write_json

    check_targets(targets)  # a malformed one fails now, not after the timing runs
    threading = apply_threads(threads)  # before JAX's CPU backend starts (environment() starts it)
    definitions = __doc__.split("Definitions (docs/benchmarks.md restates them):")[1].split("\n\n")[0].strip()
    result = {"suite": suite, "repeats": repeats, "environment": {**environment(), **threading}, "cases": [],
              "definitions": definitions}
    import jax

    # On a GPU the models stay between cases (a later case reuses the compiled programs); on a
    # CPU the memory is tight, and each case builds its own.
    models = None if jax.default_backend() == "cpu" else {}
    start = time.perf_counter()
    took: dict[str, list] = {}  # by case part: (seconds taken, seconds estimated) of the finished cases
    for case in cases:
        elapsed = time.perf_counter() - start
        estimate = getattr(case, "estimate_seconds", None)
        # rescaled by the finished cases of its part, or by all of them while its part has none
        done = took.get(getattr(case, "part", ""), []) or [x for part in took.values() for x in part]
        if estimate is not None and done:
            estimate *= sum(t for t, _ in done) / sum(e for _, e in done)
        late = max_seconds is not None and (elapsed + (estimate or 0.0) > max_seconds if estimate is not None
                                            else elapsed > max_seconds)
        if late:
            why = f"would end past --max-seconds {max_seconds:g} (at {elapsed:.0f}s, ~{estimate:.0f}s needed)" \
                if estimate is not None else f"past --max-seconds {max_seconds:g}"
            result["cases"].append({"case": dataclasses.asdict(case), "label": case.label, "runs": [],
                                    "skipped": True, "notes": [f"skipped: {why}"]})
            log(f"{case.label}: skipped: {why}")
        else:
            loads = {"before": other_load()}
            record = run_case(case, repeats, log=log, models=models)
            loads["after"] = other_load()
            record["other_load"] = loads
            record["seconds"] = time.perf_counter() - start - elapsed
            note = busy_machine_note(loads, threading["threads"])
            if note:
                record.setdefault("notes", []).append(note)
                log(f"  {note}")
            result["cases"].append(record)
            if estimate is not None:
                took.setdefault(case.part, []).append((record["seconds"], case.estimate_seconds))
        result["targets"] = target_figures(result, targets)
        result["environment"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        if json_path is not None:
            write_json(json_path, result)
    result["targets"] = target_figures(result, targets)
    if json_path is not None:
        write_json(json_path, result)
    return result


# --- targets ------------------------------------------------------------------------


_TARGET_KEYS = {"name", "case", "run", "value", "target", "unit", "over"}


def check_targets(targets: Sequence[dict]) -> None:
    """Each target has the form `hsd_jax.bench.suites` describes, or an HsdError says what is wrong."""
    for i, t in enumerate(targets):
        what = f"target {i + 1} ({t.get('name', 'unnamed')!r})" if isinstance(t, dict) else f"target {i + 1}"
        if not isinstance(t, dict) or not {"name", "case", "run", "value", "target"} <= set(t) or set(t) - _TARGET_KEYS:
            raise HsdError(f"{what}: give name, case, run, value and target (and optionally over, unit), "
                           "as in hsd_jax/bench/suites.py")
        pairs = [t["run"]] + ([t["over"]] if "over" in t else [])
        if not isinstance(t["case"], dict) or any(not isinstance(r, (list, tuple)) or len(r) != 2 for r in pairs):
            raise HsdError(f"{what}: case is a dict of case fields, run and over are (runner, schedule) pairs")
        if isinstance(t["target"], bool) or not isinstance(t["target"], (int, float)) or not t["target"] > 0:
            raise HsdError(f"{what}: target is a number above 0, got {t['target']!r}")
        if t.get("unit", "x") not in ("x", "%"):
            raise HsdError(f"{what}: unit is 'x' or '%', got {t['unit']!r}")


def target_figures(result: dict, targets: Sequence[dict]) -> list[dict]:
    """Each target's figure on every case and run it applies to: the figure, the target and
    `of_target` (figure / target). Information for the report; a run without the figure
    (e.g. no transformers run to compare with) gives no line."""
    figures = []
    for rec in result["cases"]:
        if rec.get("skipped"):
            continue
        runs = {(r["runner"], r["schedule"]): r for r in rec["runs"]}
        for t in targets:
            if any(rec["case"].get(k) != v for k, v in t["case"].items()):
                continue
            runner, schedule = t["run"]
            for (r_runner, r_schedule), run in runs.items():
                if runner not in ("*", r_runner):
                    continue
                if schedule != r_schedule and not (schedule == "*" and r_schedule != "vanilla"):
                    continue
                value = run.get(t["value"])
                if "over" in t:
                    base = (runs.get(tuple(t["over"])) or {}).get(t["value"])
                    value = value / base if value is not None and base else None
                if value is None:
                    continue
                named = f"{r_runner} {r_schedule} " if "*" in (runner, schedule) else ""
                figures.append({"name": f"{rec['label']}: {named}{t['name']}", "value": value, "target": t["target"],
                                "unit": t.get("unit", "x"), "of_target": value / t["target"]})
    return figures


# --- suites -------------------------------------------------------------------------


def load_suites(path=None) -> tuple[dict, dict]:
    """(SUITES, SCHEDULES): the package's (`hsd_jax.bench.suites`, installed with it), or
    those of the Python file `path` that defines them in the same form."""
    import importlib.util
    from pathlib import Path

    if path is None:
        from hsd_jax.bench import suites

        return suites.SUITES, suites.SCHEDULES
    path = Path(path)
    if not path.is_file():
        raise HsdError(f"suites file {path} does not exist")
    spec = importlib.util.spec_from_file_location("hsd_jax_bench_suites", path)
    if spec is None:  # Python imports only .py files
        raise HsdError(f"suites file {path} is not a Python file; give a .py file like hsd_jax/bench/suites.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise HsdError(f"suites file {path}:{err.lineno}: {err.msg}") from None
    if not isinstance(getattr(module, "SUITES", None), dict):
        raise HsdError(f"suites file {path} defines no SUITES dict (see hsd_jax/bench/suites.py for the form)")
    return module.SUITES, getattr(module, "SCHEDULES", {})


def _tiny_schedule(spec: str, model: str, tiny_specs: list[str], new_tokens: int) -> str:
    """The first of `tiny_specs` with the method (hsd, skipdecode, ...) that `spec` has on `model`."""
    from hsd_jax.schedules import resolve

    layers = model_config(model)[1].num_layers
    method = resolve(spec, num_layers=layers, max_new_tokens=new_tokens).spec.partition(":")[0]
    return next((s for s in tiny_specs if s.partition(":")[0] == method), spec)


def build_cases(suite: dict, schedules: dict, *, models=None, prompts=None, batches=None, beams=None,
                runners=None, schedule_specs=None, dtype=None, new_tokens=None, dry_run=False) -> list[Case]:
    """The cases of a suite, with any axis replaced by the given overrides."""
    if suite.get("kind") == "calm":
        if prompts or (beams and set(beams) != {1}) or runners:
            raise HsdError("a CALM suite takes its prompts from its models' settings, decodes greedily in compiled "
                           "mode: leave out --prompt, --beams and --runners (--schedules gives the CALM specs)")
        return build_calm_cases(suite, models=models, batches=batches, schedule_specs=schedule_specs, dtype=dtype,
                                new_tokens=new_tokens, dry_run=dry_run)
    if suite.get("kind") == "speculative":
        if prompts or (beams and set(beams) != {1}) or runners:
            raise HsdError("a speculative suite takes its prompts from its dataset, decodes greedily and "
                           "times vanilla compiled greedy against its drafts: leave out --prompt, --beams and "
                           "--runners (--schedules gives the drafts)")
        return build_speculative_cases(suite, schedules, models=models, batches=batches, drafts=schedule_specs,
                                       dtype=dtype, new_tokens=new_tokens, dry_run=dry_run)
    if dry_run:  # the suite's own small settings for a dry run, where it has them
        suite = {**suite, **suite.get("dry_run", {})}
    models = list(models or suite["models"])
    prompts = list(prompts or suite["prompts"])
    settings = [tuple(s) for s in suite["settings"]]
    sched_settings = [tuple(s) for s in suite.get("schedule_settings", settings)]
    if batches or beams:
        settings = [(b, k) for b in (batches or sorted({s[0] for s in settings}))
                    for k in (beams or sorted({s[1] for s in settings}))]
        sched_settings = settings
    runners = tuple(runners or suite["runners"])
    for r in runners:
        if r not in RUNNERS:
            raise HsdError(f"unknown runner {r!r}; choose from {', '.join(RUNNERS)}")
    dtype = dtype or suite.get("dtype", "float32")
    new_tokens = new_tokens or suite.get("new_tokens", 64)
    for model in models:
        if model not in ARCHS:
            raise HsdError(f"unknown model {model!r}; choose from {', '.join(ARCHS)}")
    schedule_runners = tuple(suite.get("schedule_runners", ("compiled", "static")))

    def case(model, prompt, setting):
        specs = schedule_specs if schedule_specs is not None else suite.get("schedules", schedules.get(model, []))
        if schedule_specs is None and "schedule_count" in suite:
            specs = specs[: suite["schedule_count"]]
        arch = TINY[ARCHS[model]["model_type"]] if dry_run else model
        if dry_run and schedule_specs is None:  # the tiny model's schedule of the same method, for each
            specs = [_tiny_schedule(spec, model, schedules.get(arch, []), new_tokens) for spec in specs]
        specs = list(dict.fromkeys(specs))  # each once
        batch, k = setting
        scheduled = setting in sched_settings
        main = Case(model=arch, prompt_len=prompt, batch=batch, num_beams=k, new_tokens=new_tokens, dtype=dtype,
                    runners=runners, schedules=tuple(specs) if scheduled else (),
                    schedule_runners=schedule_runners,
                    calm_depth=suite.get("calm_depth") if scheduled and schedule_specs is None else None,
                    estimate_seconds=suite.get("case_seconds", {}).get(model))
        if not (apart and scheduled and "static" in schedule_runners):
            return [main]
        # static mode compiles a program per schedule, each segment its own loop (minutes on a
        # deep model): a case of its own, after the rest of the setting, that the budget can skip
        return [dataclasses.replace(main, schedule_runners=tuple(r for r in schedule_runners if r != "static")),
                dataclasses.replace(main, runners=("static",), schedule_runners=("static",), calm_depth=None,
                                    part="static schedules",
                                    estimate_seconds=suite.get("static_case_seconds", {}).get(model))]

    apart = suite.get("static_apart", False)
    if suite.get("order") == "settings":  # every model at the first setting, then the next...
        split = [[case(m, p, s) for m in models] for s in settings for p in prompts]
        return [c[i] for group in split for i in range(2) for c in group if len(c) > i]
    return [c for m in models for p in prompts for s in settings for c in case(m, p, s)]


def build_speculative_cases(suite: dict, schedules: dict, *, models=None, batches=None, drafts=None, dtype=None,
                            new_tokens=None, dry_run=False) -> list[SpeculativeCase]:
    """The cases of a speculative suite (`"kind": "speculative"` in `hsd_jax.bench.suites`): its
    models (Hugging Face folders) x batch sizes, each timing vanilla against every draft x k.
    --dry-run swaps each model for tiny random GPT-2, its drafts for the tiny model's
    schedules and its prompts for a few random ones."""
    drafts = list(drafts if drafts else suite["drafts"])
    if not drafts:
        raise HsdError("a speculative suite needs at least one draft schedule (--schedules SPEC ...)")
    new_tokens = new_tokens or suite.get("new_tokens", 32)
    cases = []
    for model in models or suite["models"]:
        for batch in batches or suite["batches"]:
            case = SpeculativeCase(model=model, batch=batch, drafts=tuple(drafts),
                                   num_draft_tokens=tuple(suite["num_draft_tokens"]),
                                   dataset=suite.get("dataset"), split=suite.get("split", "validation"),
                                   num_prompts=suite.get("num_prompts", 16), new_tokens=new_tokens,
                                   dtype=dtype or suite.get("dtype", "float32"))
            if dry_run:
                tiny = list(dict.fromkeys(schedules.get("tiny-gpt2", ["hsd:s=1,min=0,max=2"])))
                case = dataclasses.replace(case, model="tiny-gpt2", dataset=None, num_prompts=2 * batch,
                                           drafts=tuple(tiny[:2]), num_draft_tokens=case.num_draft_tokens[:2])
            elif model not in ARCHS and not os.path.isdir(model):
                raise HsdError(f"{model} is not a model folder; the speculative suite times a trained model "
                               "(e.g. hsd-jax demo's, or train/commongen_small.sh's): pass --model FOLDER")
            cases.append(case)
    return cases


def build_calm_cases(suite: dict, *, models=None, batches=None, schedule_specs=None, dtype=None, new_tokens=None,
                     dry_run=False) -> list[CalmCase]:
    """The cases of a CALM suite (`"kind": "calm"` in `hsd_jax.bench.suites`): each model of
    `models` (name -> its settings: schedules, dataset, new_tokens, prompt_len) at every
    batch size. --model takes the suite's settings for a model it names (and needs
    --schedules for another); --dry-run runs tiny random GPT-2 on two prompts."""
    known = suite["models"]
    cases = []
    for model in models or list(known):
        settings = dict(known.get(model, {}))
        specs = schedule_specs if schedule_specs else settings.get("schedules")
        if not specs:
            raise HsdError(f"the CALM suite has no settings for {model}; give its CALM specs with --schedules")
        case = CalmCase(model=model, schedules=tuple(dict.fromkeys(specs)),
                        batches=tuple(batches or suite.get("batches", (1, 8))), dataset=settings.get("dataset"),
                        split=settings.get("split", "validation"), num_prompts=suite.get("num_prompts", 8),
                        prompt_len=settings.get("prompt_len", 32),
                        new_tokens=new_tokens or settings.get("new_tokens", 64),
                        dtype=dtype or suite.get("dtype", "float32"))
        if dry_run:
            case = dataclasses.replace(case, model="tiny-gpt2", dataset=None, num_prompts=2, batches=(1, 2),
                                       prompt_len=8, new_tokens=min(case.new_tokens, 8),
                                       schedules=tuple(suite.get("dry_run_schedules", case.schedules)))
        cases.append(case)
    return cases
