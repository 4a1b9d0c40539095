"""`hsd-jax train`: fine-tune (full or LoRA) or train from random GPT-2 weights."""

from __future__ import annotations

import argparse
import sys

from hsd_jax.errors import HsdError

# Kept in step with hsd_jax.data.DATASETS (not imported here, so `--help` stays instant).
DATASET_NAMES = ("cnn_dailymail", "xsum", "e2e_nlg", "common_gen", "healthcaremagic")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a GPT-2 / Phi model (full or LoRA) on source -> target pairs",
        description="Train on (source, target) pairs written as the prompt 'SOURCE =' then ' TARGET<eos>', "
        "with the loss on the target tokens only (hsd_jax.data.format_source is the prompt to generate from). "
        "Optax AdamW (linear warm-up and decay, gradient clipping), data parallel over all devices, Orbax "
        "checkpoints in OUTPUT/checkpoints, a log in OUTPUT/train_log.jsonl; OUTPUT ends as a Hugging Face "
        "model folder (LoRA merged). See train/README.md.",
    )
    parser.add_argument("--model", required=True, metavar="M",
                        help="Hugging Face folder or hub id; or random:gpt2|gpt2-medium|gpt2-large|gpt2-xl|"
                        "CONFIG.json for random GPT-2 weights (needs --tokenizer; the config's vocab_size may exceed the tokenizer's)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder or hub id (default: the model's); bpe:N learns a byte-level BPE of N "
                        "tokens on the training pairs and saves it with the model (for random weights)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset", metavar="NAME", help=f"a known dataset: {', '.join(DATASET_NAMES)}")
    data.add_argument("--train-file", metavar="FILE", help="local .jsonl / .json / .csv / .tsv of pairs")
    parser.add_argument("--split", default="train", help="split of --dataset (default: train)")
    parser.add_argument("--source-field", metavar="F", help="source field of --train-file (default: source)")
    parser.add_argument("--target-field", metavar="F", help="target field of --train-file (default: target; "
                        "a list gives one pair per reference)")
    parser.add_argument("--limit", type=int, metavar="N", help="use only the first N training pairs")
    parser.add_argument("--eval-file", metavar="FILE", help="validation pairs for a periodic validation loss")
    parser.add_argument("--eval-split", metavar="SPLIT", help="validation split of --dataset (e.g. validation)")
    parser.add_argument("--eval-every", type=int, default=0, metavar="N",
                        help="steps between validation losses (default: only at the end)")
    parser.add_argument("--eval-limit", type=int, metavar="N", help="use only the first N validation pairs")
    parser.add_argument("--mode", choices=("full", "lora"), default="full", help="what trains (default: full)")
    parser.add_argument("--epochs", type=int, default=3, metavar="N",
                        help="passes over the data; the schedule spans them (default: 3)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B",
                        help="global batch size, all devices (default: 8)")
    parser.add_argument("--learning-rate", type=float, default=5e-5, metavar="LR",
                        help="peak AdamW learning rate, reached after warm-up (6%% of the schedule unless "
                        "--warmup-steps) and decayed linearly to 0 (default: 5e-5)")
    parser.add_argument("--weight-decay", type=float, default=0.0, metavar="W", help="AdamW weight decay (default: 0)")
    parser.add_argument("--warmup-steps", type=int, metavar="N",
                        help="linear warm-up steps from 0 to --learning-rate (default: 6%% of the schedule, "
                        "so a short run may never leave warm-up; the progress bar and summary show the rate)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, metavar="G",
                        help="global-norm clipping (default: 1.0)")
    parser.add_argument("--max-steps", type=int, metavar="N",
                        help="stop after N steps; the learning-rate schedule still spans --epochs")
    parser.add_argument("--max-length", type=int, metavar="T", help="tokens per row (default: the model's context)")
    parser.add_argument("--lora-rank", type=int, default=16, metavar="R", help="LoRA rank r (default: 16)")
    parser.add_argument("--lora-alpha", type=float, default=32.0, metavar="A",
                        help="LoRA alpha; updates scale by alpha/r (default: 32)")
    parser.add_argument("--lora-targets", metavar="LIST",
                        help="comma-separated projections, e.g. attn.c_attn,c_proj or q_proj,v_proj "
                        "(default: every attention and MLP projection)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="data order and initialisation seed (default: 0)")
    parser.add_argument("--bf16", action="store_true", help="compute in bfloat16 (float32 master weights)")
    parser.add_argument("--skip-aware", nargs="+", metavar="SPEC",
                        help="schedule-aware training: train some batches under these skip schedules (specs, "
                        "presets, masks, or the group paper), so the model stays good when decoding skips layers; "
                        "each batch draws one at random or trains the full model")
    parser.add_argument("--skip-aware-prob", type=float, default=0.5, metavar="P",
                        help="share of batches trained under a --skip-aware schedule, the rest train every "
                        "layer (default: 0.5)")
    parser.add_argument("--devices", type=int, metavar="N", help="use only the first N local devices")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    parser.add_argument("--log-every", type=int, default=1, metavar="N", help="steps between log lines (default: 1)")
    parser.add_argument("--save-every", type=int, default=500, metavar="N",
                        help="steps between checkpoints (default: 500; one is always written at the end)")
    parser.add_argument("--keep-checkpoints", type=int, default=2, metavar="N",
                        help="checkpoints kept, at least 1 (default: 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="run folder; ends as a Hugging Face model folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hsd_jax.train import Interrupted, TrainConfig, train  # JAX is imported here, not at `--help`

    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else None
    if args.lora_targets is not None and not targets:
        raise HsdError("--lora-targets is empty; list projections like attn.c_attn,mlp.c_fc")
    cfg = TrainConfig(
        model=args.model, output=args.output, dataset=args.dataset, split=args.split, train_file=args.train_file,
        source_field=args.source_field, target_field=args.target_field, limit=args.limit,
        eval_file=args.eval_file, eval_split=args.eval_split, eval_every=args.eval_every, eval_limit=args.eval_limit,
        tokenizer=args.tokenizer, mode=args.mode, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm, max_steps=args.max_steps, max_length=args.max_length,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=targets, seed=args.seed,
        bf16=args.bf16, skip_aware=tuple(args.skip_aware) if args.skip_aware else None,
        skip_aware_prob=args.skip_aware_prob, resume=args.resume, devices=args.devices, log_every=args.log_every,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, progress=not args.no_progress,
    )
    try:
        result = train(cfg)
    except Interrupted as stop:  # Ctrl-C: one line naming the checkpoint to resume from
        print(f"hsd-jax train: {stop}", file=sys.stderr)
        return 130
    print(summary(result, args.max_steps))
    return 0


def summary(result, max_steps: int | None) -> str:
    """The one line a run ends with."""
    out, step, total = result.output, result.steps, result.schedule_steps
    if result.already_done and step >= total:
        return f"the run in {out} already finished at step {step} of {total}; nothing to do"
    if result.already_done:
        return (f"the run in {out} is already at step {step} of {total} and --max-steps is {max_steps}; "
                f"nothing to do (raise --max-steps above {step} to continue)")
    if not result.losses:  # a resume after a failed export: the model written, no step to train
        return f"wrote the model of step {step}, where the run had stopped; model folder: {out}"
    last = max(result.losses)
    warm = f" (still in warm-up, which lasts {result.warmup_steps} of the {total} steps)" \
        if last <= result.warmup_steps else ""
    return (f"trained to step {step} ({result.trainable_params:,} trainable parameters); last loss "
            f"{result.losses[last]:.4f} at learning rate {result.learning_rates[last]:.2e}{warm}; "
            f"model folder: {out}")
