"""`hsd-jax bench`: it runs and writes valid JSON (no timing is asserted), and its byte
accounting (weight bytes per token, ideal speedup) is exact."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hsd_jax import bench
from hsd_jax.cli import main
from hsd_jax.errors import HsdError
from hsd_jax.schedules import PROPAGATE, RUN, SKIP, resolve


def test_bench_command_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "tiny-gpt2", "--prompt", "8", "--batch", "1", "--beams", "1",
               "--runners", "transformers", "compiled", "static", "--schedules", "hsd:s=1,min=0,max=2",
               "--new-tokens", "6", "--repeats", "1", "--json", str(out), "--quiet"])
    assert rc == 0
    result = json.loads(out.read_text())
    (case,) = result["cases"]
    runs = {(r["runner"], r["schedule"]): r for r in case["runs"]}
    assert set(runs) == {("transformers", "vanilla"), ("compiled", "vanilla"), ("static", "vanilla"),
                         ("compiled", "hsd:s=1,min=0,max=2"), ("static", "hsd:s=1,min=0,max=2")}
    for r in runs.values():
        assert r["tokens"] == 6 and len(r["seconds"]) == 1 and r["tokens_per_second"] > 0
    assert runs[("static", "vanilla")]["tokens_equal_compiled"] == 1.0
    assert case["bandwidth"]["bytes_per_second"] > 0 and case["roofline_tokens_per_second"] > 0
    hsd = runs[("compiled", "hsd:s=1,min=0,max=2")]
    assert 1.0 < hsd["ideal_speedup"] < 4.0 / 2.0 + 1e-9  # at least 2 of 4 layers run every step


def test_dry_run_of_the_gpu_suite_builds_tiny_cases():
    suites, schedules = bench.load_suites()
    assert {"quick", "full", "gpu"} <= set(suites)
    cases = bench.build_cases(suites["gpu"], schedules, dry_run=True)
    assert {c.model for c in cases} == {"tiny-gpt2", "tiny-phi"}
    assert all(c.dtype == "bfloat16" and "transformers" not in c.runners for c in cases)
    quick = bench.build_cases(suites["quick"], schedules)
    assert [(c.model, c.prompt_len, c.batch, c.num_beams) for c in quick] == [("gpt2", 32, 1, 1), ("gpt2", 32, 1, 4)]
    assert quick[0].schedules and not quick[1].schedules


def test_schedule_bytes_counts_prefill_and_steps():
    sizes = {"head": 10, "layer": 100, "kv": 30}
    ops = np.array([[RUN, RUN, RUN], [RUN, PROPAGATE, SKIP], [SKIP, SKIP, RUN], [SKIP, SKIP, SKIP]], np.int8)
    # 4 tokens: the prefill (all 3 layers) then steps 0, 1, 2 (the last row is never run).
    expected = ((10 + 300) + (10 + 300) + (10 + 100 + 30) + (10 + 100)) / 4
    assert bench.schedule_bytes(ops, sizes, new_tokens=4) == pytest.approx(expected)


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-phi"])
def test_weight_bytes_cover_the_model(arch):
    lm = bench.random_model(arch)
    sizes = bench.weight_bytes(lm)
    total = sum(x.nbytes for x in __import__("jax").tree.leaves(lm.params))
    embeddings = lm.params["wpe"].nbytes if arch == "tiny-gpt2" else lm.params["embed_tokens"].nbytes
    assert sizes["head"] + lm.config.num_layers * sizes["layer"] + embeddings == total
    assert 0 < sizes["kv"] < sizes["layer"]
    vanilla = resolve("vanilla", num_layers=lm.config.num_layers, max_new_tokens=8).layer_ops()
    assert bench.schedule_bytes(vanilla, sizes, 8) == sizes["head"] + lm.config.num_layers * sizes["layer"]


def test_bad_input():
    with pytest.raises(HsdError, match="unknown model"):
        bench.hf_config("gpt5")
    suites, schedules = bench.load_suites()
    with pytest.raises(HsdError, match="unknown runner"):
        bench.build_cases(suites["quick"], schedules, runners=["jit"])
    assert main(["bench", "--suite", "nope"]) == 2
