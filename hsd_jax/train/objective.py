"""What a step computes: the loss, the jitted train and eval steps, the optimizer, and the
state they start from on the devices.

`token_nll` is the loss (target-token NLL, optionally distilling the full model into a
skipping path); `make_steps` jits one step (data parallel over a 1-D mesh, weights
replicated); `make_optimizer` is AdamW with linear warm-up and decay and global-norm
clipping; `_compiled` keeps the compiled steps of the last few settings, so a resume or a
test suite in one process compiles once.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from hsd_jax.errors import HsdError
from hsd_jax.train.settings import TrainConfig


def token_nll(params, config, batch, distill: float = 0.0, view: str = "decode"):
    """(sum of target-token NLL, number of target tokens) of a batch.

    Position t predicts token t + 1, counted where `loss_mask[t + 1]`. An optional
    `batch["active"]` (L, B, T) bool runs layer l at (b, t) only where True; an optional
    `batch["row_weight"]` (B,) weighs each row's tokens (both sums).

    `distill` > 0 reads the batch as a joint one (the full model's rows, then the same rows
    under a schedule): the second half's loss is (1 - distill) x the reference token's NLL
    + distill x the cross-entropy against the first half's predicted distribution, which
    is held fixed (self-distillation: the skipping path learns what the full model says).
    `view` (joint batches) is how the second half is computed: "decode", skip decoding
    (every position under the schedule); "draft", self-speculative drafts
    (`models.draft_forward`: each position over the full model's K/V of the earlier ones);
    "both", the mean of the two losses.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from hsd_jax.models import draft_forward, forward

    tokens, mask = batch["tokens"], batch["attention_mask"]

    def nll_of(logits, targets):  # (B, T-1)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets[:, 1:])

    half = tokens.shape[0] // 2
    if view == "decode":
        logits, _ = forward(params, config, tokens, mask, active=batch.get("active"))
        nll = nll_of(logits, tokens)
        full, students = logits[:half], [logits[half:]]
    else:  # the halves hold the same rows: the full model's copy, then the schedule's
        full, draft = draft_forward(params, config, tokens[:half], mask[:half], batch["active"][:, half:])
        students = [draft]
        if view == "both":
            students.append(forward(params, config, tokens[half:], mask[half:], active=batch["active"][:, half:])[0])
        nll = None
    if distill or nll is None:
        teacher = jax.nn.softmax(jax.lax.stop_gradient(full[:, :-1]))

        def schedule_loss(student):
            hard = nll_of(student, tokens[half:])
            return (1 - distill) * hard + distill * optax.softmax_cross_entropy(student[:, :-1], teacher) \
                if distill else hard

        sched = sum(schedule_loss(s) for s in students) / len(students)
        nll = jnp.concatenate([nll_of(full, tokens[:half]) if nll is None else nll[:half], sched])
    weight = batch["loss_mask"][:, 1:].astype(jnp.float32)
    if "row_weight" in batch:
        weight = weight * batch["row_weight"][:, None]
    return jnp.sum(nll * weight), jnp.sum(weight)


def _compute_params(trainable, frozen, mode: str, lora_scale: float, bf16: bool):
    import jax
    import jax.numpy as jnp

    from hsd_jax import lora

    params = lora.merge(frozen, trainable, lora_scale) if mode == "lora" else trainable
    if bf16:
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                              params)
    return params


def make_steps(config, tx, mode: str, lora_scale: float, bf16: bool, mesh, distill: float = 0.0,
               view: str = "decode"):
    """(train_step, eval_step), jitted: weights replicated over `mesh`, batches split on "data"
    (data parallel: XLA all-reduces the gradients). `distill`, `view`: see `token_nll`
    (training only)."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    replicated = NamedSharding(mesh, P())

    def train_step(state, frozen, batch):
        def loss_of(trainable):
            total, count = token_nll(_compute_params(trainable, frozen, mode, lora_scale, bf16), config, batch,
                                     distill, view)
            return total / jnp.maximum(count, 1.0), count

        (loss, count), grads = jax.value_and_grad(loss_of, has_aux=True)(state["trainable"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        new = {"step": state["step"] + 1, "trainable": optax.apply_updates(state["trainable"], updates),
               "opt_state": opt_state}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "target_tokens": count}

    def eval_step(trainable, frozen, batch):
        return token_nll(_compute_params(trainable, frozen, mode, lora_scale, bf16), config, batch)

    # Inputs keep the shardings they were placed with (`batch_sharding`), outputs stay replicated.
    train = jax.jit(train_step, out_shardings=(replicated, replicated), donate_argnums=0)
    evaluate = jax.jit(eval_step, out_shardings=replicated)
    return train, evaluate


def batch_sharding(mesh, key: str):
    """Batch arrays split their batch axis over "data": axis 0, or 1 for the (L, B, T) `active` mask."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    return NamedSharding(mesh, P(None, "data") if key == "active" else P("data"))


def make_optimizer(learning_rate: float, total_steps: int, warmup_steps: int | None = None,
                   weight_decay: float = 0.0, max_grad_norm: float = 1.0):
    """AdamW, linear warm-up to the learning rate then linear decay to 0, global-norm clipping.

    Returns (tx, schedule); warmup_steps None means 6% of total_steps.
    """
    import jax
    import optax

    warmup = warmup_length(total_steps, warmup_steps)
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, max(warmup, 1)),
         optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup, 1))],
        boundaries=[warmup],
    ) if warmup else optax.linear_schedule(learning_rate, 0.0, max(total_steps, 1))

    def decay_mask(tree):  # no weight decay on biases and norm scales
        return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key not in ("bias", "scale"), tree)

    tx = optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=decay_mask),
    )
    return tx, schedule


def warmup_length(total_steps: int, warmup_steps: int | None) -> int:
    """The warm-up steps: `warmup_steps`, or 6% of the schedule when None."""
    return min(warmup_steps if warmup_steps is not None else int(0.06 * total_steps), total_steps)


@functools.lru_cache(maxsize=4)
def _compiled(config, optimizer: tuple, mode: str, lora_scale: float, bf16: bool, devices: tuple,
              distill: float = 0.0, view: str = "decode"):
    """(tx, schedule, train_step, eval_step), reused by runs with the same settings in one
    process (a resume, a test suite), so jit's compiled programs are reused too."""
    from jax.sharding import Mesh

    tx, schedule = make_optimizer(*optimizer)
    mesh = Mesh(np.array(devices), ("data",))
    return (tx, schedule, *make_steps(config, tx, mode, lora_scale, bf16, mesh, distill, view))


def _devices(cfg: TrainConfig) -> list:
    """The devices the batch is split over: all (of every process), or the first `devices` local ones."""
    import jax

    if cfg.devices is not None and jax.process_count() == 1:
        if not 1 <= cfg.devices <= jax.device_count():
            raise HsdError(f"--devices {cfg.devices}: this machine has {jax.device_count()} devices")
        devices = jax.devices()[: cfg.devices]
    else:
        devices = jax.devices()
    if cfg.batch_size % len(devices):
        raise HsdError(f"--batch-size {cfg.batch_size} must be a multiple of the {len(devices)} devices "
                       "the batch is split over")
    return devices


def _initial_state(cfg: TrainConfig, lm, tx, lora_cfg, replicated) -> tuple[dict, dict]:
    """(state, frozen) on every device: LoRA adapters drawn from the seed over the frozen base
    weights, or every weight trainable and nothing frozen; the optimizer state at its start."""
    import jax

    from hsd_jax import lora

    if cfg.mode == "lora":
        frozen = lm.params
        trainable = lora.init(jax.random.key(cfg.seed), lm.params, lm.config, lora_cfg)
    else:
        frozen, trainable = {}, lm.params
    state = {"step": np.zeros((), np.int32), "trainable": trainable, "opt_state": tx.init(trainable)}
    return _replicate(state, replicated), _replicate(frozen, replicated)


def _replicate(tree: Any, sharding):
    """Places identical host/device values on every device of the mesh (across processes too)."""
    import jax

    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]), tree)
