"""Fine-tuning (full or LoRA) and from-scratch training with Optax and Orbax.

    from hsd_jax.train import TrainConfig, train
    result = train(TrainConfig(model="gpt2", train_file="pairs.jsonl", mode="lora", output="runs/x"))

What a run does, in order:
  1. locks the output folder for its lifetime (a second run into it is refused) and checks
     it: a folder holding another run needs `resume=True`;
  2. loads the model (a Hugging Face folder / hub id, or `random:<preset|config.json>`
     for weights drawn at random by the model family's initialiser: GPT-2 sizes, or a
     GPT-2 or Phi config.json) and its tokenizer;
  3. reads and tokenises the pairs (`hsd_jax.data`: prompt format, loss on the target);
  4. builds a data-parallel mesh over the local devices (all processes' devices when
     `jax.distributed` was initialised), replicates the weights and shards each batch;
  5. runs one jitted step per batch: AdamW with linear warm-up and linear decay,
     global-norm clipping, optional bfloat16 compute on float32 master weights;
  6. logs each step to `OUTPUT/train_log.jsonl`, checkpoints with Orbax under
     `OUTPUT/checkpoints` (atomic; `resume=True` restores the latest and replays the
     same batches, so the losses equal an uninterrupted run's);
  7. exports OUTPUT as a Hugging Face folder (LoRA merged into the weights).

This module is the run, to read top to bottom: `train` checks the settings and does 1,
`_setup` does 2-4 and builds what the loop needs (a `_Run`: data, model, mesh, compiled
steps, the state, restored on a resume), `_loop` does 5-6 (`_StepLog` writes each step)
and `_export` does 7. Each concern it calls on has a module of its own:

  settings     `TrainConfig`: each field a `setting` whose metadata holds its help, its
               `hsd-jax train` flag and whether a resume must repeat it (`RUN_SETTINGS`)
  model        the model and tokenizer to train (`random_gpt2`, `bpe:N`)
  batches      the pairs, each step's batch, schedule-aware masks (`skip_aware_active`)
  objective    the loss (`token_nll`), the jitted steps, the optimizer, the initial state
  run_folder   OUTPUT's lock, run.json, the resume checks, the log, the export
  stopping     Ctrl-C / SIGTERM deferred, a failure as one line naming the checkpoint

The learning-rate schedule spans `epochs` over the whole data set; `max_steps` only
stops early, so a run cut into pieces with `max_steps` and `resume` follows the same
schedule as one run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hsd_jax import data as data_lib
from hsd_jax import distributed
from hsd_jax.io import write_json
from hsd_jax.progress import progress
from hsd_jax.train.batches import (_add_skip_schedule, _batches, _model_and_data, draw_schedule, skip_aware_active,
                                   skip_aware_schedules, validation_source)
from hsd_jax.train.model import BPE_PREFIX, GPT2_PRESETS, random_gpt2
from hsd_jax.train.objective import (_compiled, _devices, _initial_state, batch_sharding, make_optimizer, make_steps,
                                     token_nll, warmup_length)
from hsd_jax.train.run_folder import (CHECKPOINTS, LOCK_FILE, LOG_FILE, ORBAX_TMP, RUN_FILE, _check_inputs_unchanged,
                                      _export, _output_lock, _prepare_output, _remove_unfinished_checkpoints,
                                      _trim_log, inputs_from_run_folder, optimiser_changes, read_log,
                                      weights_fingerprint)
from hsd_jax.train.settings import RUN_SETTINGS, TrainConfig, TrainResult, _check_config, _run_settings, setting
from hsd_jax.train.stopping import (Interrupted, LossNotFinite, _close, _export_failures, _failures_explained,
                                    _Saves, _signals_deferred)

__all__ = [
    "BPE_PREFIX", "CHECKPOINTS", "GPT2_PRESETS", "LOCK_FILE", "LOG_FILE", "ORBAX_TMP", "RUN_FILE", "RUN_SETTINGS",
    "Interrupted", "TrainConfig", "TrainResult",
    "batch_sharding", "draw_schedule", "make_optimizer", "make_steps", "random_gpt2", "read_log", "setting",
    "skip_aware_active", "skip_aware_schedules", "token_nll", "train", "warmup_length", "weights_fingerprint",
]


def train(cfg: TrainConfig) -> TrainResult:
    """Runs (or resumes) a training run; see the module docstring."""
    _check_config(cfg)
    out = Path(cfg.output)
    distributed.maybe_initialize()
    import jax

    with _output_lock(out, enabled=jax.process_index() == 0):
        return _run(cfg, out)


def _run(cfg: TrainConfig, out: Path) -> TrainResult:
    previous = _prepare_output(cfg, out)
    run = _setup(cfg, out, previous)
    if isinstance(run, TrainResult):  # a resume with nothing left to do
        return run
    try:
        with _failures_explained(out, run.manager):
            log = _loop(run)
            if run.lead:
                with _export_failures():
                    _export(out, run.lm, run.trained_params(), run.record, run.end)
    finally:
        _close(run.manager)
    return TrainResult(steps=run.end, losses=log.losses, eval_losses=log.eval_losses,
                       trainable_params=run.record["trainable_params"], learning_rates=log.learning_rates,
                       **run.summary)


@dataclasses.dataclass
class _Run:
    """What the loop needs, built by `_setup`: data, model, mesh, compiled steps and the
    training state (`state` is replaced by each step)."""

    cfg: TrainConfig
    out: Path
    lead: bool  # process 0: writes run.json, the log and the model
    lm: Any  # the loaded model: config, tokenizer, base weights
    train_data: Any  # data_lib.encode_pairs of the training pairs
    eval_data: Any  # ... of the validation pairs, or None
    skip_schedules: list | None  # the schedules of `skip_aware`
    mesh: Any  # 1-D, axis "data"
    steps_per_epoch: int
    start: int  # the step restored (0 for a new run)
    stop: int  # the step this call trains to
    manager: Any  # Orbax CheckpointManager of OUTPUT/checkpoints
    schedule: Any  # optax schedule: step -> learning rate
    train_step: Any
    eval_step: Any
    lora_scale: float
    state: dict  # {"step", "trainable", "opt_state"}, replicated
    frozen: dict  # the base weights under LoRA, {} in full training
    record: dict  # what run.json holds
    summary: dict  # the TrainResult fields known before training

    @property
    def end(self) -> int:
        """The step the run stands at after the loop (a resume past `stop` trains nothing)."""
        return max(self.stop, self.start)

    def to_device(self, batch: dict) -> dict:
        """The global batch, each process contributing its share of the rows (all of them with one
        process; a joint schedule-aware batch has twice `batch_size` rows)."""
        import jax

        def local(key, v):
            axis = 1 if key == "active" else 0
            n = v.shape[axis] // jax.process_count()
            return np.take(v, np.arange(jax.process_index() * n, (jax.process_index() + 1) * n), axis=axis)

        return {k: jax.make_array_from_process_local_data(batch_sharding(self.mesh, k), local(k, v), v.shape)
                for k, v in batch.items()}

    def evaluate(self) -> float:
        """The validation loss of the current weights: mean NLL per target token."""
        total_nll, count = 0.0, 0.0
        size = self.cfg.batch_size
        order = np.argsort(self.eval_data.lengths, kind="stable")  # fixed order, little padding
        for i in range(0, len(order), size):
            batch = data_lib.make_batch(self.eval_data, order[i:i + size], size)
            s, n = self.eval_step(self.state["trainable"], self.frozen, self.to_device(batch))
            total_nll, count = total_nll + float(s), count + float(n)
        return total_nll / max(count, 1.0)

    def trained_params(self):
        """The model's weights now: LoRA merged into the base weights, or the trained ones."""
        from hsd_jax import lora

        if self.cfg.mode == "lora":
            return lora.merge(self.frozen, self.state["trainable"], self.lora_scale)
        return self.state["trainable"]


def _setup(cfg: TrainConfig, out: Path, previous: dict | None) -> _Run | TrainResult:
    """Steps 2-4 of the module docstring and what step 5 starts from: model and data, mesh,
    optimizer and compiled steps, the state (restored on a resume), run.json. A resume that
    finds the run over and its model written returns its TrainResult instead."""
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from hsd_jax import lora

    lead = jax.process_index() == 0
    lm, train_data, eval_data, max_len = _model_and_data(cfg)
    config = lm.config
    lora_cfg = lora.LoraConfig(cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets) if cfg.lora_targets else None)
    if cfg.mode == "lora":  # a target that names no projection fails here, before OUTPUT holds anything
        lora.resolve_targets(lm.params, config, lora_cfg)
    skip_schedules = skip_aware_schedules(cfg.skip_aware, config.num_layers, max_len) if cfg.skip_aware else None
    fingerprint, base_weights = train_data.fingerprint(), weights_fingerprint(lm.params)
    if previous is not None:
        _check_inputs_unchanged(previous, out, fingerprint, base_weights)

    # Devices: a 1-D mesh; the global batch splits over it, the weights are replicated.
    devices = _devices(cfg)
    mesh = Mesh(np.array(devices), ("data",))

    spe = data_lib.steps_per_epoch(len(train_data), cfg.batch_size)
    total = cfg.epochs * spe
    stop = min(cfg.max_steps or total, total)
    if lead and cfg.max_steps and cfg.max_steps > total:
        print(f"note: --max-steps {cfg.max_steps} is past the end of {cfg.epochs} epochs; stopping at step {total} "
              "(raise --epochs to train longer)", file=sys.stderr)
    summary = dict(output=out, num_train_pairs=len(train_data), schedule_steps=total,
                   warmup_steps=warmup_length(total, cfg.warmup_steps))

    if lead and previous is not None:
        _remove_unfinished_checkpoints(out / CHECKPOINTS)
    manager = ocp.CheckpointManager(
        (out / CHECKPOINTS).resolve(),
        options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True),
    )
    start = (manager.latest_step() or 0) if previous is not None else 0
    if previous is not None and start >= stop and previous.get("exported_step") == start:
        manager.close()  # the run is over and its model written: rewriting it would change nothing
        return TrainResult(steps=start, losses={}, eval_losses={}, already_done=True,
                           trainable_params=int(previous.get("trainable_params", 0)), **summary)

    optimizer = (cfg.learning_rate, total, cfg.warmup_steps, cfg.weight_decay, cfg.max_grad_norm)
    tx, schedule, train_step, eval_step = _compiled(config, optimizer, cfg.mode, lora_cfg.scale, cfg.bf16,
                                                    tuple(devices), cfg.skip_aware_distill,
                                                    cfg.skip_aware_view)
    state, frozen = _initial_state(cfg, lm, tx, lora_cfg, NamedSharding(mesh, P()))
    num_trainable = sum(x.size for x in jax.tree.leaves(state["trainable"]))
    settings = _run_settings(cfg)
    # Adam's state does not depend on these settings: the optimiser restored runs on with the new ones.
    changes = optimiser_changes(previous["settings"], settings) if previous is not None else ""
    changes = f" with other optimiser settings ({changes})" if changes else ""
    if start:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
        if lead:
            print(f"resuming {out} from step {start}{changes}", file=sys.stderr)
    elif previous is not None and lead:
        print(f"no checkpoint in {out / CHECKPOINTS}; starting from step 0{changes}", file=sys.stderr)

    record = {"settings": settings, "inputs_from_run_folder": inputs_from_run_folder(settings, out),
              "data_fingerprint": fingerprint, "base_weights": base_weights,
              "train_pairs": len(train_data), "steps_per_epoch": spe, "schedule_steps": total,
              "devices": len(devices), "trainable_params": int(num_trainable)}
    if eval_data is not None:  # this start's; a resume may change it, so each validation log line names its own
        record["validation"] = {"data": validation_source(cfg), "pairs": len(eval_data), "every": cfg.eval_every}
    if lead:
        write_json(out / RUN_FILE, record)
        _trim_log(out / LOG_FILE, start)
    return _Run(cfg=cfg, out=out, lead=lead, lm=lm, train_data=train_data, eval_data=eval_data,
                skip_schedules=skip_schedules, mesh=mesh,
                steps_per_epoch=spe, start=start, stop=stop, manager=manager, schedule=schedule,
                train_step=train_step, eval_step=eval_step, lora_scale=lora_cfg.scale, state=state, frozen=frozen,
                record=record, summary=summary)


def _loop(run: _Run) -> _StepLog:
    """Steps 5-6: one jitted step per batch from `run.start` to `run.stop`, each step logged;
    the validation loss and a checkpoint when due, both at the last step, and a checkpoint
    of the step reached when Ctrl-C or SIGTERM stops the run. A save that fails, at once or
    in Orbax's background threads, stops the run at the step after (`_Saves`)."""
    import jax

    cfg = run.cfg
    log = _StepLog(run)
    saves = _Saves(run.manager)
    pending = None  # the previous step's metrics, read after the next step is dispatched
    # Ctrl-C / SIGTERM ends the run after the step in flight, with a checkpoint of it, so
    # an interrupt loses no finished step. Not across processes: a save is collective, and
    # a signal may reach only one of them.
    stopping = (_signals_deferred("stopping after this step to save a checkpoint; Ctrl-C again stops at once")
                if jax.process_count() == 1 else contextlib.nullcontext([]))
    try:
        with stopping as interrupted:
            for step, batch in _batches(run):
                batch, trained_under = _add_skip_schedule(run, batch, step)
                run.state, metrics = run.train_step(run.state, run.frozen, run.to_device(batch))
                saves.check()  # while the step runs: did the last save end without its checkpoint?
                done = step + 1
                if pending is not None:
                    log.write(*pending)
                pending = (done, metrics, int(batch["attention_mask"].sum()), trained_under)
                due_eval = run.eval_data is not None and ((cfg.eval_every and done % cfg.eval_every == 0)
                                                          or done == run.stop)
                due_save = done % cfg.save_every == 0 or done == run.stop
                eval_loss = run.evaluate() if due_eval else None
                stop = bool(interrupted)  # a signal after this read is the next step's to save
                if due_eval or due_save or stop:
                    log.write(*pending, eval_loss=eval_loss)  # the log never lags a checkpoint
                    pending = None
                if due_save or stop:
                    with _signals_deferred():
                        saves.save(done, run.state)
                    stop = bool(interrupted)  # this step is saved, whenever the signal came
                if stop:
                    break
            if pending is not None:
                log.write(*pending)
            saves.check(wait=True)
        if interrupted:  # the handler before ours returned: still, the run did not finish
            raise KeyboardInterrupt
    finally:
        log.close()
    return log


class _StepLog:
    """Where each step's metrics go: the result's dicts, OUTPUT/train_log.jsonl (process 0;
    every `log_every` steps, at the last step and with each validation loss) and the progress bar."""

    def __init__(self, run: _Run):
        self.run = run
        self.losses: dict[int, float] = {}
        self.learning_rates: dict[int, float] = {}
        self.eval_losses: dict[int, float] = {}
        self.bar = _progress(run.cfg.progress and run.lead, run.start, run.stop)
        self.file = (run.out / LOG_FILE).open("a") if run.lead else None
        self.t_last, self.tokens_since = time.perf_counter(), 0  # tokens/s counts since the last line
        self.t_start = self.t_last

    def write(self, step: int, metrics: dict, tokens: int, trained_under: str | None,
              eval_loss: float | None = None) -> None:
        """Records step `step` (reading its metrics waits for it); a loss that is not finite ends the run."""
        cfg = self.run.cfg
        loss = float(metrics["loss"])
        self.losses[step] = loss
        now = time.perf_counter()
        self.tokens_since += tokens
        if not math.isfinite(loss):
            raise LossNotFinite(step, loss, cfg.bf16)
        record = {"step": step, "epoch": round(step / self.run.steps_per_epoch, 4), "loss": loss,
                  "lr": float(self.run.schedule(step - 1)), "grad_norm": float(metrics["grad_norm"]),
                  "target_tokens": int(metrics["target_tokens"])}
        if trained_under is not None:
            record["schedule"] = trained_under
        self.learning_rates[step] = record["lr"]
        if eval_loss is not None:
            self.eval_losses[step] = record["eval_loss"] = eval_loss
            record["eval_data"] = self.run.record["validation"]["data"]
        # Tokens/s over the steps since the last log line: the bar shows it at every step (a step
        # between log lines has a rate too, and it is not 0), the log line when one is written.
        rate = self.tokens_since / max(now - self.t_last, 1e-9)
        if step % cfg.log_every == 0 or step == self.run.stop or eval_loss is not None:
            record["tokens_per_s"] = round(rate, 1)
            record["elapsed_s"] = round(now - self.t_start, 2)
            self.t_last, self.tokens_since = now, 0
            if self.file is not None:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}",  # a run still in warm-up shows it
                                 tok_s=f"{rate:.0f}", refresh=False)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.bar is not None:
            self.bar.close()


def _progress(enabled: bool, start: int, stop: int):
    """tqdm with loss, learning rate, tokens/s and ETA on process 0 (a plain line every 10 s in a log)."""
    return progress(total=stop, initial=start, unit="step", smoothing=0.1) if enabled else None
