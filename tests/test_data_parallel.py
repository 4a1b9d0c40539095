"""Decoding data-parallel: a batch split over several devices gives one device's output,
and several processes (jax.distributed) share a file and write one device's rows.

Forced host devices must be set before JAX starts, so the multi-device checks run in
subprocesses (`XLA_FLAGS=--xla_force_host_platform_device_count=4`); on this machine
they share the same cores, so nothing here measures speed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hsd_jax
from hsd_jax.engine import _ints, pad_rows
from hsd_jax.errors import HsdError
from hsd_jax.generate import rows_interact
from tests.conftest import make_gpt2

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["dog frisbee catch", "cat mat sit", "sun beach walk", "river boat row", "tree bird sing",
           "car road drive", "book read quiet"]


def environment(devices: int, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def python(script: str, *argv, devices: int = 4, timeout: float = 600) -> str:
    """Runs `script` in a fresh Python with `devices` forced host devices; its stdout."""
    proc = subprocess.run([sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True,
                          env=environment(devices), timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def cli(*argv, devices: int = 1, cwd: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hsd_jax.cli", *map(str, argv)], cwd=cwd,
                            env=environment(devices, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    """(stdout, stderr) of a command that must succeed."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return out, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dp-tiny")
    make_gpt2(folder, layers=4, initializer_range=0.3, seed=3)  # confident enough for CALM to exit
    return folder


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dp-text")
    make_gpt2(folder, layers=2, vocab=50257, tokenizer=True)
    return folder


# --- on one device (this process) -------------------------------------------------------


def test_padding_copies_the_last_row_and_counts_only_real_rows():
    x = np.arange(10).reshape(5, 2)
    padded = pad_rows(x, 4)
    assert padded.shape == (8, 2) and (padded[5:] == x[-1]).all() and (padded[:5] == x).all()
    assert pad_rows(x, 5) is x
    # A per-row count sums the real rows only; a batch-wide count stays as it is.
    assert _ints({"drafted": np.array([2, 2, 1, 1, 1]), "rounds": np.int32(3)}, 3) == {"drafted": 5, "rounds": 3}


def test_devices_are_checked_and_reported(tiny):
    lm = hsd_jax.load(tiny)
    g = hsd_jax.generate(lm, input_ids=[[1, 2, 3]], max_new_tokens=3)
    assert g.devices == 1
    for bad in (0, -1, True, 1.5):
        with pytest.raises(HsdError, match="devices must be a positive integer"):
            hsd_jax.generate(lm, input_ids=[[1, 2, 3]], max_new_tokens=3, devices=bad)
    with pytest.raises(HsdError, match=r"devices=2, but this process has 1 CPU device; ask for at most 1"):
        hsd_jax.generate(lm, input_ids=[[1, 2, 3]], max_new_tokens=3, devices=2)


def test_rows_interact_names_the_batch_wide_rules(tiny):
    lm = hsd_jax.load(tiny)
    assert not rows_interact(lm, {"schedule": "hsd:s=1,min=0,max=2", "num_beams": 4})
    assert not rows_interact(lm, {"schedule": "calm:lambda=0.1"})  # exit=row, the default
    assert rows_interact(lm, {"schedule": "calm:lambda=0.1,exit=batch"})
    assert rows_interact(lm, {"draft": "hsd:s=1,min=0,max=2,warmup=1"})
    assert not rows_interact(lm, {"schedule": "no such schedule"})  # generate says what is wrong


# --- 4 forced devices against 1 ---------------------------------------------------------

FOUR_AGAINST_ONE = """
import json, sys
import jax
import hsd_jax
from hsd_jax.errors import HsdError

assert len(jax.local_devices()) == 4, jax.local_devices()
lm = hsd_jax.load(sys.argv[1])
prompts = [[5, 9, 17, 3, 44], [8], [60, 61, 2, 7], [1, 1, 1], [100, 3, 22, 9, 9, 14], [7, 70, 3], [12, 2]]
CASES = {
    "greedy": {}, "beam4": {"num_beams": 4},
    "hsd": {"schedule": "hsd:s=1,min=0,max=2"},
    "hsd-static-beam4": {"schedule": "hsd:s=1,min=0,max=2", "mode": "static", "num_beams": 4},
    "calm": {"schedule": "calm:lambda=0.2"},
    "calm-beam4": {"schedule": "calm:lambda=0.2", "num_beams": 4},
    "calm-batch": {"schedule": "calm:lambda=0.02,exit=batch"},  # exits at some steps
    "calm-state": {"schedule": "calm:lambda=0.9,measure=state"},
    "draft": {"draft": "hsd:s=1,min=0,max=2,warmup=1", "num_draft_tokens": 2},
}
out = {}
for name, options in CASES.items():
    for rows in (5, 3) if name in ("greedy", "beam4") else (5,):  # 5 rows: 3 copies pad them to 8
        for devices in (1, None):
            g = hsd_jax.generate(lm, input_ids=prompts[:rows], max_new_tokens=10, devices=devices, **options)
            out[f"{name}/{rows}/{devices}"] = {"sequences": g.sequences, "layers": g.layers_per_token,
                                               "stats": g.draft_stats, "devices": g.devices}
try:
    hsd_jax.generate(lm, input_ids=prompts, max_new_tokens=3, mode="eager", devices=4)
except HsdError as err:
    out["eager"] = str(err)
# iter_batches: batch_size prompts per device, unless rows interact (then per call)
from hsd_jax.generate import iter_batches
calls = {}
for name, options in (("plain", {}), ("calm-batch", {"schedule": "calm:lambda=0.2,exit=batch"})):
    calls[name] = [[first, len(g.sequences), g.devices]
                   for first, g in iter_batches(lm, prompts, batch_size=1, max_new_tokens=4, **options)]
out["calls"] = calls
print(json.dumps(out))
"""


def test_four_devices_decode_as_one(tiny):
    out = json.loads(python(FOUR_AGAINST_ONE, tiny).strip().splitlines()[-1])
    assert "one-device reference" in out.pop("eager")
    calls = out.pop("calls")
    assert calls["plain"] == [[0, 4, 4], [4, 3, 4]]  # 1 prompt x 4 devices per call; the last 3 + 1 copy
    assert calls["calm-batch"] == [[i, 1, 1] for i in range(7)]  # 1 prompt per call, as on one device
    cases = sorted({key.rsplit("/", 1)[0] for key in out})
    assert len(cases) == 11
    for case in cases:
        one, four = out[f"{case}/1"], out[f"{case}/None"]
        rows = int(case.split("/")[1])
        assert one["devices"] == 1 and four["devices"] == min(rows, 4), case
        assert four["sequences"] == one["sequences"], case
        assert four["layers"] == one["layers"], case
        assert four["stats"] == one["stats"], case
        assert len(one["sequences"]) == rows
    # The comparisons mean something: CALM exits before the last layer (per row and per
    # batch), HSD skips, and the draft's rounds are counted.
    for case in ("calm/5", "calm-beam4/5", "calm-batch/5", "calm-state/5"):
        made = [n for row in out[f"{case}/1"]["layers"] for n in row]
        assert min(made) < 4 < max(made) + 1, (case, made)
    assert out["draft/5/1"]["stats"]["drafted"] > 0
    assert out["beam4/5/1"]["sequences"] != out["greedy/5/1"]["sequences"]


def test_cli_decodes_a_file_on_four_devices_as_on_one(text_model, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    common = ["generate", "--model", text_model, "--input-file", src, "--max-new-tokens", "6", "--num-beams", "2",
              "--schedule", "hsd:s=1,min=0,max=1", "--batch-size", "1"]
    summary4, _ = finish(cli(*common, "--output", tmp_path / "four.jsonl", devices=4, cwd=tmp_path))
    summary1, _ = finish(cli(*common, "--output", tmp_path / "one.jsonl", "--devices", "1", devices=4, cwd=tmp_path))
    four = (tmp_path / "four.jsonl").read_text().splitlines()
    assert len(four) == len(PROMPTS) and four == (tmp_path / "one.jsonl").read_text().splitlines()
    assert "| 4 devices" in summary4 and "| 1 device\n" in summary1


# --- two processes under jax.distributed ------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(argv, cwd: Path, processes: int = 2, devices: int = 2) -> list[subprocess.Popen]:
    """`hsd-jax ARGV` as `processes` processes of one jax.distributed run on localhost,
    each with `devices` forced host devices."""
    port = free_port()
    return [cli(*argv, devices=devices, cwd=cwd, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i)) for i in range(processes)]


def test_two_processes_write_one_processs_output(text_model, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    common = ["generate", "--model", text_model, "--input-file", src, "--max-new-tokens", "6", "--num-beams", "2",
              "--batch-size", "1"]
    shared = tmp_path / "shared"
    shared.mkdir()
    procs = launch([*common, "--output", shared / "out.jsonl"], cwd=tmp_path)
    outs = [finish(proc) for proc in procs]
    assert "2 processes x 2 devices" in outs[0][0]  # process 0's summary line
    # Process 1 only decodes: no rows and no summary of its own (Gloo, JAX's CPU collectives, may
    # print to its stdout).
    assert "waiting for process 0" in outs[1][1] and "schedule" not in outs[1][0] and "wrote" not in outs[1][0]
    finish(cli(*common, "--output", tmp_path / "one.jsonl", "--devices", "1", cwd=tmp_path))
    merged = (shared / "out.jsonl").read_text().splitlines()
    assert [json.loads(r)["prompt"] for r in merged] == PROMPTS
    assert merged == (tmp_path / "one.jsonl").read_text().splitlines()
    assert sorted(p.name for p in shared.iterdir()) == ["out.jsonl"]  # written once, atomically, nothing left


def test_two_processes_resume_what_one_process_left(text_model, tmp_path):
    from hsd_jax.cli import build_parser
    from hsd_jax.commands.generate import _settings
    from hsd_jax.io import settings_path, write_json

    src = tmp_path / "in.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    common = ["generate", "--model", text_model, "--input-file", src, "--max-new-tokens", "6", "--batch-size", "1"]
    finish(cli(*common, "--output", tmp_path / "one.jsonl", "--devices", "1", cwd=tmp_path))
    rows = (tmp_path / "one.jsonl").read_text().splitlines(keepends=True)
    out = tmp_path / "two.jsonl"  # as an interrupted run leaves it: 3 rows and their settings
    (tmp_path / "two.jsonl.partial").write_text("".join(rows[:3]))
    write_json(settings_path(out), _settings(build_parser().parse_args([str(a) for a in (*common, "--output", out)])))
    outs = [finish(proc) for proc in launch([*common, "--output", out, "--resume"], cwd=tmp_path)]
    assert "4 prompts (+3 resumed)" in outs[0][0]
    assert out.read_text() == "".join(rows)


def test_two_processes_evaluate_as_one(text_model, tmp_path):
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"source": s, "target": s.upper()}) + "\n" for s in PROMPTS))
    common = ["eval", "--model", text_model, "--eval-file", dev, "--schedules", "vanilla", "hsd:s=1,min=0,max=1",
              "--num-beams", "2", "--max-new-tokens", "6", "--batch-size", "1", "--no-bertscore"]
    procs = launch([*common, "--output", tmp_path / "two"], cwd=tmp_path)
    for proc in procs:
        finish(proc)
    finish(cli(*common, "--output", tmp_path / "one", "--devices", "1", cwd=tmp_path))
    for name in ("vanilla", "hsd-s-1-min-0-max-1-t-6-warmup-0"):
        two = (tmp_path / "two" / "predictions" / f"{name}.jsonl").read_text()
        assert two == (tmp_path / "one" / "predictions" / f"{name}.jsonl").read_text()
    rows = [json.loads((tmp_path / d / "results.json").read_text())["rows"] for d in ("one", "two")]
    scores = [[{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rs] for rs in rows]
    assert scores[0] == scores[1]


# --- the bench's devices row ------------------------------------------------------------


def test_bench_devices_row_times_all_devices_against_one(tmp_path):
    out = tmp_path / "devices.json"
    finish(cli("bench", "--suite", "devices", "--dry-run", "--batch", "2", "--new-tokens", "4", "--json", out,
               "--quiet", devices=4, cwd=tmp_path))
    cases = json.loads(out.read_text())["cases"]
    assert len(cases) == 2  # greedy and beam 4
    for case in cases:
        runs = {r["runner"]: r for r in case["runs"]}
        assert set(runs) == {"compiled", "devices"}
        row = runs["devices"]
        assert row["devices"] == 4 and row["inputs"] == 8 and row["tokens_equal_compiled"] == 1.0
        assert row["speedup_vs_one_device"] > 0
        assert row["inputs_per_second"] == pytest.approx(8 / row["seconds_median"])


def test_bench_leaves_the_devices_row_out_on_one_device():
    from hsd_jax import bench

    record = bench.run_case(bench.Case(model="tiny-gpt2", prompt_len=8, batch=1, new_tokens=3,
                                       runners=("compiled", "devices")), repeats=1, log=lambda msg: None)
    assert [r["runner"] for r in record["runs"]] == ["compiled"]
    assert any(note.startswith("devices left out: one local device") for note in record["notes"])
