"""Benchmark suites for `hsd-jax bench --suite NAME` (see docs/benchmarks.md).

A suite crosses its models x prompt lengths x (batch, beams) settings; every case
times vanilla under `runners` and each of the model's `SCHEDULES` under
`schedule_runners` (only for the settings in `schedule_settings`, when given).
Command-line flags replace any axis (--model, --prompt, --batch/--beams,
--schedules, --runners, --repeats, --dtype). Pure data: no imports.
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
    },
    # One H200, under 8 minutes (eval/bench_gpu.sh): compiled (a lax.switch per layer,
    # each a host sync on GPU) against static (straight-line segments), vanilla and HSD.
    "gpu": {
        "models": ["gpt2-large", "phi-2"],
        "prompts": [32],
        "settings": [(1, 1), (32, 1), (1, 4)],
        "dtype": "bfloat16",
        "new_tokens": 64,
        "runners": ["compiled", "static"],
        "schedule_runners": ["compiled", "static"],
        "schedules": ["hsd-s1-20"],
        "repeats": 3,
        "order": "settings",  # both models at batch 1 first, in case the time limit cuts the rest
    },
}
