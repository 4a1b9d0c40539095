"""The run folder OUTPUT: its lock, run.json, the resume checks, the log, the export.

    OUTPUT/.lock             held (flock) by the live run
    OUTPUT/run.json          the settings a resume must repeat (their files also as paths
                             from OUTPUT, so a folder moved with its inputs resumes), the
                             data and base-weight fingerprints, the step the model holds
    OUTPUT/train_log.jsonl   one line per logged step (`read_log`)
    OUTPUT/checkpoints/      Orbax checkpoints, one folder per step
    OUTPUT/config.json, model.safetensors, tokenizer files: the model (`_export`)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from hsd_jax.errors import HsdError
from hsd_jax.io import write_json, write_text
from hsd_jax.train.settings import (PATH_SETTINGS, RESUME_MAY_CHANGE, RUN_SETTINGS, TrainConfig, _run_settings,
                                    input_path)

RUN_FILE = "run.json"
LOG_FILE = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
LOCK_FILE = ".lock"  # held (flock) by the live run; the OS drops it when the process dies
# Orbax writes a checkpoint to "<step>.orbax-checkpoint-tmp[-<time>]" and renames it when complete.
ORBAX_TMP = ".orbax-checkpoint-tmp"


@contextlib.contextmanager
def _output_lock(out: Path, enabled: bool):
    """Holds an OS lock on OUTPUT/.lock while the run lives, so a second run into the folder
    is refused instead of interleaving its log and checkpoints with this one's. The OS drops
    the lock when the process dies (kill -9 too), so no stale lock is left behind. A folder
    this run created and left empty (it failed before writing) is removed again."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform (Windows): run unlocked
        fcntl = None
    if not enabled or fcntl is None:
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    with open(lock, "a+") as handle:
        _take_lock(fcntl, handle, lock, out)
        try:
            yield
        finally:
            if created and out.is_dir() and [p.name for p in out.iterdir()] == [LOCK_FILE]:
                lock.unlink()
                out.rmdir()


def _take_lock(fcntl, handle, lock: Path, out: Path) -> None:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        ours = False
    except OSError as err:  # a file system without locks (some NFS mounts)
        print(f"note: cannot lock {lock} ({err.strerror}), so nothing stops a second run into {out}",
              file=sys.stderr)
        return
    else:  # a run that failed at start removes the file: a lock on the removed file locks nothing
        ours = lock.exists() and os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino
    if not ours:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        raise HsdError(f"--output {out} is in use by another training run (process {holder}); wait for it to "
                       "end, or choose another --output")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")  # names the holder to a refused run
    handle.flush()


def _prepare_output(cfg: TrainConfig, out: Path) -> dict | None:
    """Checks the output folder; returns the previous run's record when resuming one."""
    run_file = out / RUN_FILE
    busy = out.exists() and any(p.name != LOCK_FILE for p in out.iterdir())
    if not busy:
        return None
    if not run_file.exists():
        raise HsdError(f"--output {out} is not empty and holds no training run; choose a new or empty folder")
    if not cfg.resume:
        raise HsdError(f"--output {out} holds another training run; pass --resume to continue it, "
                       "or choose another --output")
    previous = _read_run_file(run_file)
    then, now = previous["settings"], _run_settings(cfg)
    moved_with = previous.get("inputs_from_run_folder") or {}
    here = inputs_from_run_folder(now, out)
    changed = [k for k in RUN_SETTINGS if then.get(k) != now[k] and k not in RESUME_MAY_CHANGE
               and not (k in PATH_SETTINGS and _same_input(then.get(k), now[k], moved_with.get(k), here.get(k)))]
    if changed:
        diffs = "; ".join(f"{k}: {then.get(k)!r} then, {now[k]!r} now" for k in changed)
        raise HsdError(f"--resume must repeat the settings of the run in {out} ({diffs}); "
                       "pass the same values, or start a new run in another --output")
    return previous


def optimiser_changes(then: dict, now: dict) -> str:
    """The `RESUME_MAY_CHANGE` settings a resume changes, as flags ("" when none): allowed, so
    that a run whose loss became nan continues at a lower learning rate, and said in the log."""
    return ", ".join(f"--{k.replace('_', '-')} {then[k]} then, {now[k]} now"
                     for k in RESUME_MAY_CHANGE if k in then and then[k] != now[k])


def inputs_from_run_folder(settings: dict, out: Path) -> dict:
    """The `PATH_SETTINGS` that name a file or folder, as paths from the run folder (run.json
    records them): a run folder moved or copied together with its inputs (the demo's folder,
    a project folder) still names the same ones."""
    found = {key: input_path(settings[key]) for key in PATH_SETTINGS}
    return {key: prefix + os.path.relpath(path.resolve(), out.resolve())
            for key, (prefix, path) in ((k, v) for k, v in found.items() if v)}


def _same_input(then, now, then_from_run: str | None, now_from_run: str | None) -> bool:
    """Whether a recorded path setting and today's name the same input: the same path once
    resolved (older runs recorded some relative to where they were started), or the same
    path from the run folder (the folder moved with it). The data and base weights are
    compared by fingerprint after (`_check_inputs_unchanged`)."""
    if then_from_run is not None and then_from_run == now_from_run:
        return True
    if not (isinstance(then, str) and isinstance(now, str)):
        return False
    prefix = "random:" if now.startswith("random:") else ""
    return then.startswith(prefix) and Path(then[len(prefix):]).resolve() == Path(now[len(prefix):]).resolve()


def _read_run_file(path: Path) -> dict:
    fix = "restore it, or start a new run in another --output"
    try:
        record = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise HsdError(f"{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise HsdError(f"{path} holds no run settings; {fix}")
    return record


def weights_fingerprint(params) -> dict:
    """{"sha256": of all arrays, "arrays": {path: short digest}}: each array's path, dtype,
    shape and bytes, in path order; the per-array digests let a resume name what changed."""
    import jax

    total, arrays = hashlib.sha256(), {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:  # dict keys in sorted order
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        array = np.ascontiguousarray(np.asarray(leaf))
        digest = hashlib.sha256(f"{name} {array.dtype} {array.shape}".encode())
        digest.update(array.reshape(-1).view(np.uint8))
        arrays[name] = digest.hexdigest()[:16]
        total.update(digest.digest())
    return {"sha256": total.hexdigest(), "arrays": arrays}


def _check_inputs_unchanged(previous: dict, out: Path, data_fingerprint: str, base_weights: dict) -> None:
    """A resume must see the data and base weights the run began with (the settings only name
    them), or its batches and losses would not continue the run's."""
    if previous.get("data_fingerprint") != data_fingerprint:
        raise HsdError(f"the training data differs from the data the run in {out} began with, so the "
                       "batches would not repeat; restore the data, or start a new run in another --output")
    before = previous.get("base_weights")  # absent in runs recorded before it was
    if before is None or before.get("sha256") == base_weights["sha256"]:
        return
    old, new = before.get("arrays", {}), base_weights["arrays"]
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    named = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
    raise HsdError(f"the base model's weights differ from those the run in {out} began with ({named} changed) "
                   f"though --model {previous['settings'].get('model')} is the same; restore those weights, "
                   "or start a new run in another --output")


def _remove_unfinished_checkpoints(folder: Path) -> None:
    """Deletes the temporary folders of saves a stopped run left unfinished: Orbax never reads
    them, and the next save of that step would meet one."""
    for stale in sorted(folder.glob(f"*{ORBAX_TMP}*")) if folder.is_dir() else []:
        print(f"note: removing {stale}, a checkpoint a stopped run left unfinished", file=sys.stderr)
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()


def _log_lines(path: Path, note: bool) -> list[tuple[str, dict]]:
    """(line, object) for each line of the log. A torn last line (the run was killed while
    writing it) is dropped; a bad line before the last means other damage, so it is an error."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    parsed = []
    for number, line in enumerate(lines, 1):
        try:
            parsed.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if number < len(lines):
                raise HsdError(f"{path}: log line {number} is not JSON; repair or delete that line") from None
            if note:
                print(f"note: dropping the torn last line of {path} (the run was stopped while writing it)",
                      file=sys.stderr)
    return parsed


def _trim_log(path: Path, last_step: int) -> None:
    """Drops log lines past the restored step (the run died after logging, before saving)."""
    if not path.exists():
        return
    keep = [line for line, record in _log_lines(path, note=True) if record["step"] <= last_step]
    write_text(path, "".join(line + "\n" for line in keep))


def _export(out: Path, lm, params, record: dict, step: int) -> None:
    """OUTPUT as a Hugging Face folder; run.json then records the step it holds, so a resume
    with nothing left to train leaves it alone (and one after a failed export writes it)."""
    from hsd_jax import checkpoint
    from hsd_jax.models.modules import LanguageModel

    model = LanguageModel(config=lm.config, params=params, tokenizer=lm.tokenizer, hf_config=lm.hf_config)
    checkpoint.save_pretrained(model, out)
    write_json(out / RUN_FILE, {**record, "exported_step": step})


def read_log(output: str | os.PathLike) -> list[dict]:
    """The objects of OUTPUT/train_log.jsonl, in order (without a torn last line)."""
    return [record for _, record in _log_lines(Path(output) / LOG_FILE, note=False)]
