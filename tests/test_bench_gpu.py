"""eval/bench_gpu.sh (issue 35): its flags are checked before anything runs, its dry run (tiny
models of both families on the CPU) writes every case's figures where $OUT points, and a run
stopped by SIGTERM keeps the cases it finished and leaves no benchmark running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "eval" / "bench_gpu.sh"

# What every timed run of a case records, and what the hsd-jax runs add.
RUN_FIELDS = {"runner", "schedule", "tokens_per_second", "ms_per_step", "compile_seconds", "avg_layers",
              "speedup_vs_transformers", "speedup_vs_vanilla", "ideal_speedup", "speedup_over_ideal",
              "fraction_of_roofline", "fraction_of_hbm_peak"}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return {**env, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", **extra}


def _script(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env or _env(), cwd=ROOT)


def test_help_and_bad_flags_before_anything(tmp_path):
    proc = _script("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: eval/bench_gpu.sh")
    assert "timeout_s=480" in proc.stdout  # how a session with a GPU runs it
    for args in (["--bogus"], ["extra"], ["--budget", "soon"], ["--results"]):
        proc = _script("--results", str(tmp_path / "r"), *args) if args != ["--results"] else _script(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "eval/bench_gpu.sh:" in proc.stderr
        assert not (tmp_path / "r").exists()  # refused before anything was made


def test_dry_run_writes_every_case_into_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # a budget no loaded CI machine runs past, so that every case runs
    proc = _script("--dry-run", "--budget", "3000", env=_env(OUT=str(out)), timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"gpu.json", "gpu-hf-static.json", "log.txt", "versions.txt"}
    assert "jax " in (out / "versions.txt").read_text()
    result = json.loads((out / "gpu.json").read_text())
    env = result["environment"]
    assert {"device", "jax", "jaxlib", "torch", "transformers", "threads"} <= set(env)
    cases = result["cases"]
    assert [(c["case"]["model"], c["case"]["part"]) for c in cases] == [
        ("tiny-gpt2", ""), ("tiny-phi", ""), ("tiny-gpt2", "static schedules"), ("tiny-phi", "static schedules")]
    for c in cases:
        assert not c.get("skipped"), c["notes"]
        layers = c["weights"]["num_layers"]
        for r in c["runs"]:
            assert RUN_FIELDS <= set(r), (c["label"], set(RUN_FIELDS) - set(r))
            assert r["tokens_per_second"] > 0 and r["ms_per_step"] > 0
            if r["runner"] in ("compiled", "static"):  # the HLO of its program: a switch per layer, or none;
                flow = r["control_flow"]  # CALM a cond per layer after the first ("has every row exited?")
                expected = 0 if r["runner"] == "static" else layers - 1 if r["schedule"].startswith("calm") else layers
                assert flow["conditionals_per_step"] == expected, (r, flow)
    main = {(r["runner"], r["schedule"].split(":")[0]) for r in cases[0]["runs"]}
    assert main == {("transformers", "vanilla"), ("compiled", "vanilla"), ("static", "vanilla"),
                    ("compiled", "hsd"), ("compiled", "skipdecode"), ("compiled", "calm")}
    assert {(r["runner"], r["schedule"].split(":")[0]) for r in cases[2]["runs"]} == {
        ("static", "vanilla"), ("static", "hsd"), ("static", "skipdecode")}
    assert [t["avg_layers"] for t in cases[0]["calm_search"]]  # the lambda search for CALM's depth
    (hf_static,) = json.loads((out / "gpu-hf-static.json").read_text())["cases"]
    assert [r["runner"] for r in hf_static["runs"]] == ["transformers-static", "static"]
    assert hf_static["runs"][0]["cache_implementation"] == "static"
    log = (out / "log.txt").read_text()
    assert "HLO: compiled 4 conditionals per decode step" in log and "vs HF" in log


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_sigterm_stops_the_benchmark_and_keeps_the_finished_cases(tmp_path):
    results = tmp_path / "res"
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry-run", "--budget", "3000", "--results", str(results)],
                            cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        path = results / "gpu.json"

        def finished_cases():
            try:
                return [c for c in json.loads(path.read_text())["cases"] if c["runs"]]
            except (OSError, ValueError):
                return []

        _wait_for(lambda: finished_cases(), 600, "the first finished case")
        bench = [pid for pid in _children(proc.pid) if b"hsd_jax.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert bench, "no benchmark process under the script"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output[-2000:]
    for pid in bench:  # the script exited only after its benchmark had stopped (and reaped it)
        assert not Path(f"/proc/{pid}").exists()
    kept = finished_cases()
    assert kept and kept[0]["runs"][0]["tokens_per_second"] > 0
    assert "interrupted; the finished cases are in" in output
    assert not (results / "gpu-hf-static.json").exists()  # nothing started after the signal
