"""Side-by-side decode benchmarks (`hsd-jax bench`): transformers against hsd-jax, vanilla
against layer-skipping schedules, self-speculative decoding and CALM, each timed against
vanilla in the same rounds on the same machine.

One module per case kind, and what they share:

- `common`: the architectures (`ARCHS`) and their models with random weights, the weight
  bytes a decode step reads (`weight_bytes`, `schedule_bytes`: the ideal speedup), the
  memory-bandwidth probe and the GPUs' peak (`hbm_peak`), a timed `Run`, timed loops of
  jitted calls, table cells; the machine's other load (`other_load`, `busy_machine_note`),
  one thread count for XLA and PyTorch (`apply_threads`), and the conditionals and while
  loops of a compiled program (`control_flow`).
- `schedules`: `Case` (transformers / eager / compiled / static, vanilla and schedules),
  `run_case` (which hands the other kinds to theirs) and the table rows.
- `speculative`: `SpeculativeCase`, `StepCosts`, `run_speculative_case` and its rows.
- `calm`: `CalmCase`, `calm_step_costs`, `SoftmaxTestCost`, `run_calm_case`,
  `calm_figures` and its rows.
- `suite`: `run_suite`, the targets, `load_suites` and `build_cases` (every kind's
  cases); its docstring defines the figures every result carries.
- `report`: `format_table` and `print_table`.
- `suites`: the suites themselves, as data (`SUITES`, `SCHEDULES`, the targets); a
  `--suites-file` of the same form replaces them.

Every name below is importable from `hsd_jax.bench`; JAX, PyTorch and transformers load
only when a benchmark runs.
"""

from __future__ import annotations

from hsd_jax.bench.calm import (CALM_HEADER, CalmCase, SoftmaxTestCost, calm_figures, calm_step_costs,
                                run_calm_case)
from hsd_jax.bench.common import (ARCHS, HBM_PEAK, NOISY, TINY, Bandwidth, Run, TimedLoops, apply_threads,
                                  busy_machine_note, control_flow, hbm_peak, hf_config, hf_config_from_dict,
                                  last_program_control_flow, model_config, other_load, random_model, schedule_bytes,
                                  torch_model, weight_bytes)
from hsd_jax.bench.report import format_table, print_table
from hsd_jax.bench.schedules import (HEADER, RUNNERS, TRANSFORMERS_CACHES, Case, case_rows, control_flow_line,
                                     lm_layers, run_case)
from hsd_jax.bench.speculative import SPECULATIVE_HEADER, SpeculativeCase, StepCosts, run_speculative_case
from hsd_jax.bench.suite import (build_calm_cases, build_cases, build_speculative_cases, check_targets, environment,
                                 load_suites, run_suite, target_figures)

__all__ = [
    "ARCHS", "CALM_HEADER", "HBM_PEAK", "HEADER", "NOISY", "RUNNERS", "SPECULATIVE_HEADER", "TINY",
    "TRANSFORMERS_CACHES", "Bandwidth", "CalmCase", "Case", "Run", "SoftmaxTestCost", "SpeculativeCase", "StepCosts",
    "TimedLoops", "apply_threads", "busy_machine_note", "control_flow", "control_flow_line", "hbm_peak",
    "last_program_control_flow", "other_load",
    "build_calm_cases", "build_cases", "build_speculative_cases", "calm_figures", "calm_step_costs", "case_rows",
    "check_targets", "environment", "format_table", "hf_config", "hf_config_from_dict", "lm_layers",
    "load_suites", "model_config", "print_table", "random_model", "run_calm_case", "run_case",
    "run_speculative_case", "run_suite", "schedule_bytes", "target_figures", "torch_model", "weight_bytes",
]
