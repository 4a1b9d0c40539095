"""Benchmark suites for `hsd-jax bench --suite NAME` (see docs/benchmarks.md).

Part of the package, so an installed `hsd-jax bench` has them without a checkout.
A suite crosses its models x prompt lengths x (batch, beams) settings; every case
times vanilla under `runners` and each of the model's `SCHEDULES` under
`schedule_runners` (only for the settings in `schedule_settings`, when given).
Command-line flags replace any axis (--model, --prompt, --batch/--beams,
--schedules, --runners, --repeats, --dtype). `--suites-file PY` reads a Python file
of your own that defines `SUITES` (and `SCHEDULES`) in this form instead.

A suite with `"kind": "speculative"` times self-speculative greedy decoding instead
(`hsd_jax.bench.SpeculativeCase`): a trained model's folder (`models`; --model
replaces them), prompts from `dataset` (a dataset name, or a file; "{model}" stands for
the model folder), `batches`, and vanilla compiled greedy against every draft in
`drafts` (--schedules replaces them) x `num_draft_tokens`, in the same rounds.

A suite with `"kind": "calm"` times CALM against vanilla (`hsd_jax.bench.CalmCase`):
`models` maps each model (an architecture, random weights, or a trained folder) to its
settings (CALM `schedules`, `dataset` for a folder's prompts, `new_tokens`,
`prompt_len`), timed at each of `batches` over the same `num_prompts` prompts
(--model, --batch and --schedules replace them).

A suite's `targets` are figures the report prints next to a target value, for every
case and run a target applies to:
  name    what the figure is, in the report line
  case    the case fields it applies to (model, dtype, batch, prompt_len, num_beams)
  run     (runner, schedule) of the run the figure comes from; "*" for the runner means
          every runner, for the schedule every schedule but vanilla (the line then
          names the run)
  value   the run's field in the JSON (speedup_vs_transformers, fraction_of_roofline,
          tokens_per_second, speedup_over_ideal, ...)
  over    optional (runner, schedule): the figure is value(run) / value(over)
  target  the value aimed for; unit "x" (a ratio) or "%" (a fraction, printed as %)
The report prints the figures; tests/test_bench.py asserts the ones that must hold.
Pure data: no imports.
"""

# Schedules compared with vanilla, per architecture. The 36/32-layer models use the
# paper's presets (schedules/*.json); the smaller ones the same shapes scaled to
# their depth (max = half the layers, SkipDecode's min = a quarter).
SCHEDULES = {
    "gpt2": ["skipdecode:min=3,max=6", "hsd:s=1,min=0,max=6", "hsd:s=2,min=0,max=6"],
    "gpt2-medium": ["skipdecode:min=6,max=12", "hsd:s=1,min=0,max=12", "hsd:s=2,min=0,max=12"],
    "gpt2-large": ["skipdecode-10-20", "hsd-s1-20", "hsd-s2-20"],
    "phi-2": ["skipdecode-10-20", "hsd-s1-20", "hsd-s2-20"],
    "tiny-gpt2": ["skipdecode:min=1,max=2", "hsd:s=1,min=0,max=2"],
    "tiny-phi": ["skipdecode:min=1,max=2", "hsd:s=1,min=0,max=2"],
}

# The speed targets set for this project on CPU, stated on GPT-2 small, float32, batch 1,
# prompt 32 (docs/performance.md#results-and-targets says which were met and why not).
_GPT2_SMALL = {"model": "gpt2", "dtype": "float32", "batch": 1, "prompt_len": 32}
CPU_TARGETS = [
    {"name": "compiled vs transformers", "case": {**_GPT2_SMALL, "num_beams": 1}, "run": ("compiled", "vanilla"),
     "value": "speedup_vs_transformers", "target": 2.0, "unit": "x"},
    {"name": "compiled vs transformers", "case": {**_GPT2_SMALL, "num_beams": 4}, "run": ("compiled", "vanilla"),
     "value": "speedup_vs_transformers", "target": 3.0, "unit": "x"},
    {"name": "compiled, fraction of memory roofline", "case": {**_GPT2_SMALL, "num_beams": 1},
     "run": ("compiled", "vanilla"), "value": "fraction_of_roofline", "target": 0.8, "unit": "%"},
    {"name": "static / compiled speed", "case": _GPT2_SMALL, "run": ("static", "vanilla"),
     "over": ("compiled", "vanilla"), "value": "tokens_per_second", "target": 1.0, "unit": "x"},
    {"name": "speedup / ideal", "case": {**_GPT2_SMALL, "num_beams": 1}, "run": ("*", "*"),
     "value": "speedup_over_ideal", "target": 0.9, "unit": "%"},
]

# The issue-35 targets on a GPU (bfloat16, prompt 128): figures for the report.
_GPU_B1 = {"dtype": "bfloat16", "prompt_len": 128, "batch": 1, "num_beams": 1}
_GPU_B32 = {**_GPU_B1, "batch": 32}
GPU_TARGETS = [
    *({"name": f"{mode} vanilla, fraction of HBM peak", "case": _GPU_B1, "run": (mode, "vanilla"),
       "value": "fraction_of_hbm_peak", "target": 0.7, "unit": "%"} for mode in ("compiled", "static")),
    *({"name": f"{mode} vs transformers", "case": case, "run": (mode, "vanilla"), "value": "speedup_vs_transformers",
       "target": target, "unit": "x"} for mode in ("compiled", "static") for case, target in ((_GPU_B1, 3.0),
                                                                                             (_GPU_B32, 1.5))),
    *({"name": "speedup / ideal", "case": case, "run": ("static", "*"), "value": "speedup_over_ideal",
       "target": 0.85, "unit": "%"} for case in (_GPU_B1, _GPU_B32)),
]

SUITES = {
    # A few minutes on a laptop-class CPU: the figures the CPU targets are stated on.
    "quick": {
        "models": ["gpt2"],
        "prompts": [32],
        "settings": [(1, 1), (1, 4)],  # (batch, beams): greedy and beam 4 at batch 1
        "dtype": "float32",
        "new_tokens": 64,
        "runners": ["transformers", "eager", "compiled", "static"],
        "schedule_runners": ["compiled", "static"],
        "schedule_settings": [(1, 1)],
        "schedule_count": 2,  # the first two of the model's SCHEDULES
        "repeats": 3,
        "targets": CPU_TARGETS,
    },
    # Everything, on CPU (hours on 2 cores: GPT-2 large and Phi-2 at prompt 512).
    "full": {
        "models": ["gpt2", "gpt2-medium", "gpt2-large", "phi-2"],
        "prompts": [32, 512],
        "settings": [(1, 1), (8, 1), (1, 4)],
        "dtype": "float32",
        "new_tokens": 64,
        "runners": ["transformers", "eager", "compiled", "static"],
        "schedule_runners": ["compiled", "static"],
        "repeats": 3,
        "targets": CPU_TARGETS,
    },
    # One H100 or H200 in one device call (eval/bench_gpu.sh, issue 35): GPT-2 large and Phi-2
    # in bfloat16, prompt 128, 128 new tokens; transformers (dynamic cache) against compiled and
    # static vanilla, the paper's HSD s=1 / s=2 and SkipDecode presets in both modes, and CALM's
    # state measure near half depth. Settings by value (both models at each before the next):
    # batch 1 (the roofline), 32, beam 4 at 1, then 8, beam 4 at 8, and 64 if time is left.
    # `case_seconds` are guesses, rescaled by the cases of the same part done, that skip a case
    # that would end past --max-seconds (a 36-layer static HSD program took 156 s to compile on
    # 2 loaded CPU cores). --dry-run takes `dry_run`'s settings on the tiny models instead.
    "gpu": {
        "models": ["gpt2-large", "phi-2"],
        "prompts": [128],
        "settings": [(1, 1), (32, 1), (1, 4), (8, 1), (8, 4), (64, 1)],
        "dtype": "bfloat16",
        "new_tokens": 128,
        "runners": ["transformers", "compiled", "static"],
        "schedule_runners": ["compiled", "static"],
        "schedules": ["hsd-s1-20", "hsd-s2-20", "skipdecode-10-20"],
        "calm_depth": 0.5,
        "repeats": 3,
        "order": "settings",
        "case_seconds": {"gpt2-large": 45, "phi-2": 60},
        "static_apart": True,  # each setting's static-mode schedules in a case of their own, after its others
        "static_case_seconds": {"gpt2-large": 120, "phi-2": 120},
        "dry_run": {"prompts": [8], "settings": [(2, 4)], "new_tokens": 8},  # greedy: gpu-hf-static's
        "targets": GPU_TARGETS,
    },
    # transformers with `cache_implementation="static"` (it compiles the forward itself on
    # CUDA, a minute or more), beside static vanilla on the same shape: eval/bench_gpu.sh runs
    # it after the gpu suite when time is left.
    "gpu-hf-static": {
        "models": ["gpt2-large"],
        "prompts": [128],
        "settings": [(1, 1)],
        "dtype": "bfloat16",
        "new_tokens": 128,
        "runners": ["transformers-static", "static"],
        "schedule_runners": [],
        "schedules": [],
        "repeats": 3,
        "case_seconds": {"gpt2-large": 100},
        "dry_run": {"prompts": [8], "new_tokens": 8},
    },
}

# Data-parallel decoding (docs/benchmarks.md, "Devices"): compiled vanilla on one device
# against all local devices, each device the case's batch (runner "devices"; left out, with
# a note, where there is one device). On CPU, forced host devices
# (XLA_FLAGS=--xla_force_host_platform_device_count=N) share the same cores: the row then
# checks that it runs, not a speedup. "devices-gpu" is eval/bench_gpu.sh's multi-GPU case.
SUITES["devices"] = {
    "models": ["gpt2"],
    "prompts": [32],
    "settings": [(8, 1), (8, 4)],
    "dtype": "float32",
    "new_tokens": 32,
    "runners": ["compiled", "devices"],
    "schedule_runners": [],
    "schedule_count": 0,
    "repeats": 3,
}
SUITES["devices-gpu"] = {
    **SUITES["devices"],
    "models": ["gpt2-large", "phi-2"],
    "settings": [(32, 1), (8, 4)],
    "dtype": "bfloat16",
    "new_tokens": 64,
    "order": "settings",
}

# Self-speculative decoding (docs/performance.md, "Self-speculative decoding"): drafts that
# run 3 to 11 of 12 layers (layer 0 always), k = 1 .. 4, on a trained 12-layer model.
SPECULATIVE_DRAFTS = [
    "skipdecode:min=2,max=2,warmup=1",  # layers 0, 10, 11
    "hsd:s=5,min=0,max=2,warmup=1",  # layers 0, 5, 10, 11 at first, 0, 5, 11 at the end (3.3 on average)
    "hsd:s=2,min=0,max=4,warmup=1",  # 7 layers at first, 5 at the end (6.0 on average over 32 steps)
    "hsd:s=1,min=0,max=8,warmup=1",  # 11 layers at first, 7 at the end (8.9 on average over 32 steps)
]
_SPECULATIVE = {
    "kind": "speculative",
    "drafts": SPECULATIVE_DRAFTS,
    "num_draft_tokens": [1, 2, 3, 4],
    "batches": [1, 8],  # batch 8: the cost of the batch minimum of accepted drafts
    "num_prompts": 16,
    "dtype": "float32",
    "repeats": 3,
}
SUITES.update({
    # The CommonGen reproduction's model (train/commongen_small.sh: 12 x 256, 64 positions),
    # on CommonGen dev concept sets (the shared data folder or the hub).
    "speculative": {**_SPECULATIVE, "models": ["runs/commongen_small"], "dataset": "common_gen",
                    "split": "validation", "new_tokens": 32},
    # The offline demo's model (`hsd-jax demo`: 12 x 128) on its own dev records.
    "speculative-demo": {**_SPECULATIVE, "models": ["hsd-jax-demo/model"], "dataset": "{model}/../data/dev.jsonl",
                         "new_tokens": 64},
    # eval/bench_gpu.sh: the demo's model on one GPU, batch 1 and 32.
    "speculative-gpu": {**_SPECULATIVE, "models": ["hsd-jax-demo/model"], "dataset": "{model}/../data/dev.jsonl",
                        "new_tokens": 64, "batches": [1, 32], "num_prompts": 32},
})

# CALM against vanilla (`hsd-jax bench --suite calm`, docs/performance.md "CALM: per-sequence
# exits"): each measure at three thresholds, softmax response tested only at every 4th layer,
# and lambda > 1 (cannot exit: compiled with no exit test), at batch 1 and 8 over the same
# prompts, on random GPT-2 small weights (never confident: softmax runs its tests without
# exiting, which measures what a test costs) and on the CommonGen reproduction's trained
# model (train/commongen_small.sh; the case is skipped where that folder is missing).
CALM_MODELS = {
    "gpt2": {"new_tokens": 32, "prompt_len": 32, "schedules": [
        "calm:lambda=1.5", "calm:lambda=0.02", "calm:lambda=0.02,every=4",
        "calm:lambda=0.85,measure=state", "calm:lambda=0.9,measure=state", "calm:lambda=0.93,measure=state"]},
    "runs/commongen_small": {"dataset": "common_gen", "split": "validation", "new_tokens": 32, "schedules": [
        "calm:lambda=1.5", "calm:lambda=0.02", "calm:lambda=0.3", "calm:lambda=0.8", "calm:lambda=0.3,every=4",
        "calm:lambda=0.98,measure=state", "calm:lambda=0.99,measure=state", "calm:lambda=0.995,measure=state"]},
}
SUITES["calm"] = {
    "kind": "calm",
    "models": CALM_MODELS,
    "batches": [1, 8],
    "num_prompts": 8,
    "dtype": "float32",
    "repeats": 3,
    "dry_run_schedules": ["calm:lambda=1.5", "calm:lambda=0.02", "calm:lambda=0.9,measure=state"],
}
