"""`hsd-jax generate`: decode prompts (or a whole file, in batches) under a schedule."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hsd_jax.errors import HsdError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text with a layer-skip schedule (vanilla, SkipDecode, HSD, CALM)",
        description="Decode prompts with a Hugging Face GPT-2 / Phi checkpoint under a layer-skip schedule. "
        "With --input-file the whole file is decoded in batches of one compiled program "
        "and written as JSON lines.",
    )
    p.add_argument("--model", required=True, help="local Hugging Face folder or hub id (e.g. gpt2-large)")
    p.add_argument("--schedule", default="vanilla",
                   help="spec ('hsd:s=1,min=0,max=20', 'skipdecode:min=10,max=20', 'calm:lambda=0.02'), "
                        "preset name (hsd-jax schedule --list) or .npy mask; default vanilla")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    src.add_argument("--input-file", type=Path,
                     help="one prompt per line, or .jsonl with the prompt in --field")
    p.add_argument("--field", default="prompt", help="jsonl field holding the prompt (default: prompt)")
    p.add_argument("--seq2seq", action="store_true",
                   help="prompts are sources for a model fine-tuned by hsd-jax train: add its separator")
    p.add_argument("--output", type=Path, help="write one JSON line per prompt here (atomically)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch with --input-file (default 8)")
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy (default); the paper uses 4")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--early-stopping", choices=["true", "false", "never"], default="false")
    p.add_argument("--mode", choices=["compiled", "static", "eager"], default="compiled",
                   help="compiled: schedule as data, one program for all schedules; static: schedule baked "
                        "in, no per-layer conditionals (fastest on GPU); eager: plain Python reference")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--no-eos", action="store_true", help="never stop at EOS: always max-new-tokens tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")
    p.set_defaults(func=run)


def read_prompts(path: Path, field: str) -> list[str]:
    """Prompts from a text file (one per line) or a .jsonl file (one object per line)."""
    if not path.exists():
        raise HsdError(f"input file {path} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise HsdError(f"input file {path} holds no prompts")
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise HsdError(f"{path}:{n} is not valid JSON ({err.msg})") from err
        if not isinstance(row, dict) or field not in row:
            keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise HsdError(f"{path}:{n} has no field {field!r} (it has: {keys}); pick one with --field")
        prompts.append(str(row[field]))
    return prompts


def run(args: argparse.Namespace) -> int:
    import hsd_jax
    from hsd_jax.io import write_jsonl

    prompts = args.prompt if args.prompt else read_prompts(args.input_file, args.field)
    if args.seq2seq:
        from hsd_jax.data import format_source

        prompts = [format_source(p) for p in prompts]
    lm = hsd_jax.load(args.model, dtype=args.dtype)
    if lm.tokenizer is None:
        raise HsdError(f"{args.model} has no tokenizer files; generate needs them to encode text prompts")
    options = dict(
        schedule=args.schedule, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, mode=args.mode,
        length_penalty=args.length_penalty,
        early_stopping={"true": True, "false": False, "never": "never"}[args.early_stopping],
    )
    if args.no_eos:
        options["eos_token_id"] = None

    if args.prompt:  # a handful of prompts: one batch, exactly as given
        g = hsd_jax.generate(lm, prompts=prompts, **options)
    else:
        g = hsd_jax.generate_batched(lm, prompts, batch_size=args.batch_size, **options)
    results = [
        {"prompt": p, "text": text, "tokens": seq, "layers_per_token": per_token,
         "avg_layers": sum(per_token) / len(per_token)}
        for p, text, seq, per_token in zip(prompts, g.texts, g.sequences, g.layers_per_token)
    ]

    if args.output:
        write_jsonl(args.output, results)
    for r in results if not args.output or args.json else []:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            print(f"--- {r['prompt']!r}\n{r['text']}\n    layers per token: {r['layers_per_token']}")
    summary = (f"schedule {g.schedule} | {len(results)} prompts, {g.num_tokens} tokens | "
               f"Avg. Layer {g.avg_layers:.2f} of {lm.config.num_layers} | "
               f"{g.tokens_per_second:.1f} tokens/s (compile excluded)")
    print(summary, file=sys.stderr if args.json else sys.stdout)
    if args.output:
        print(f"wrote {args.output}", file=sys.stderr if args.json else sys.stdout)
    return 0
