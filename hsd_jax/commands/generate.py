"""`hsd-jax generate`: decode prompts (or a whole file, in batches) under a schedule."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from pathlib import Path

from hsd_jax.errors import HsdError, os_error_text

INTERRUPTED = 130  # the shell's exit code for a Ctrl-C


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
                     help="one prompt per line (blank lines skipped), .jsonl with the prompt in --field, "
                          "or .json holding a list of such objects or of strings; UTF-8")
    p.add_argument("--field", default="prompt", help="jsonl field holding the prompt (default: prompt)")
    p.add_argument("--seq2seq", action="store_true",
                   help="prompts are sources for a model fine-tuned by hsd-jax train: add its separator")
    p.add_argument("--truncate-sources", action="store_true",
                   help="cut a prompt too long for the model's context (with --max-new-tokens) from its end, as "
                   "training cuts a source (its start is kept); without it such a prompt is refused, naming it, "
                   "before anything is decoded, as hsd-jax eval refuses a source too long")
    p.add_argument("--output", type=Path,
                   help="write one JSON line per prompt here; rows are saved to OUTPUT.partial as batches "
                        "finish (the options that made them to OUTPUT.settings.json, so --resume can check "
                        "them), and OUTPUT appears (atomically) when all are done")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="keep the rows an interrupted run left in OUTPUT.partial (or OUTPUT) "
                            "and decode only the rest")
    again.add_argument("--overwrite", action="store_true",
                       help="start over, replacing the rows of an earlier run in OUTPUT (or OUTPUT.partial)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="prompts per device in a batch with --input-file: a batch decodes batch-size x devices "
                        "prompts in one call (batch-size alone with CALM exit=batch or --draft, whose decisions "
                        "are batch-wide, so the output does not depend on the devices); default 8")
    p.add_argument("--devices", type=int, metavar="N",
                   help="split each batch over the first N of this process's devices (default: all of them); "
                        "the output is the same on any number. Under jax.distributed (several processes, "
                        "docs/multihost.md) --input-file is shared out among the processes and process 0 "
                        "writes the output")
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy (default); the paper uses 4")
    p.add_argument("--draft", metavar="SPEC",
                   help="lossless self-speculative greedy decoding: this static schedule (spec, preset or .npy "
                        "mask, e.g. 'hsd:s=1,min=0,max=4,warmup=1') drafts tokens and all layers verify them, so "
                        "the output is vanilla greedy's (--schedule stays vanilla; greedy only)")
    p.add_argument("--num-draft-tokens", type=int, metavar="K",
                   help="with --draft: tokens drafted per round, each round verified by one all-layer pass "
                        "(default 2)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt, at most")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: scores are divided by length**penalty (as in transformers)")
    p.add_argument("--early-stopping", choices=["true", "false", "never"], default="false",
                   help="beam search's stopping rule, as transformers' early_stopping")
    p.add_argument("--mode", choices=["compiled", "static", "eager"], default="compiled",
                   help="compiled: schedule as data, one program for all schedules; static: schedule baked "
                        "in, no per-layer conditionals (fastest on GPU; schedules of many segments fall "
                        "back to compiled); eager: plain Python reference")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and activations; bfloat16 halves memory and suits GPUs")
    p.add_argument("--no-eos", action="store_true", help="never stop at EOS: always max-new-tokens tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")
    p.set_defaults(func=run)


# --- prompt files ------------------------------------------------------------------------

def read_prompts(path: Path, field: str) -> list[str]:
    """Prompts from a text file (one per line), a .jsonl file (one object or string per
    line) or a .json file (a list of objects or strings). Errors name the 1-based line
    (blank lines count) or, in a .json file, the item."""
    text = _read_utf8(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        prompts = _json_prompts(path, text, field)
    else:
        # Lines end at "\n" only: str.splitlines would also split at U+2028 and other
        # separators inside a prompt, and shift every later output row.
        lines = [(n, line.removesuffix("\r")) for n, line in enumerate(text.split("\n"), 1)]
        lines = [(n, line) for n, line in lines if line.strip()]
        if suffix == ".jsonl":
            prompts = [_prompt_of(_json_line(path, n, line), field, f"{path}:{n}") for n, line in lines]
        else:
            prompts = [line for _, line in lines]
    if not prompts:
        raise HsdError(f"input file {path} holds no prompts")
    return prompts


def _read_utf8(path: Path) -> str:
    if not path.exists():
        raise HsdError(f"input file {path} does not exist")
    if path.is_dir():
        raise HsdError(f"input file {path} is a directory; give a file with one prompt per line")
    try:
        return path.read_bytes().decode("utf-8-sig")  # -sig: drops the byte-order mark some editors write
    except OSError as err:  # no permission, an I/O error
        raise HsdError(f"cannot read input file {path} ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise HsdError(f"input file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                       f"{err.start}); save it as UTF-8") from err


def _json_line(path: Path, n: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise HsdError(f"{path}:{n} is not valid JSON ({err.msg})") from err


def _json_prompts(path: Path, text: str, field: str) -> list[str]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise HsdError(f"{path}:{err.lineno} is not valid JSON ({err.msg})") from err
    if not isinstance(items, list):
        raise HsdError(f"{path} holds a JSON {type(items).__name__}; a .json prompt file holds a list "
                       f"of strings or of objects with the field {field!r}")
    return [_prompt_of(item, field, f"{path} item {n}") for n, item in enumerate(items, 1)]


def _prompt_of(item, field: str, where: str) -> str:
    """The prompt in one JSON item: a string, or an object's `field` holding a string."""
    if isinstance(item, dict):
        if field not in item:
            raise HsdError(f"{where} has no field {field!r} (it has: {', '.join(item)}); pick one with --field")
        item = item[field]
    if not isinstance(item, str):
        kind = "null" if item is None else type(item).__name__
        raise HsdError(f"{where}: the prompt is {kind}, not a string; every prompt must be text")
    if not item.strip():
        raise HsdError(f"{where}: the prompt is {'empty' if not item else 'only whitespace'}; every prompt "
                       "needs text")
    return item


# --- output rows -------------------------------------------------------------------------

def _earlier_rows(args: argparse.Namespace, prompts: list[str]) -> list[dict]:
    """The rows an interrupted run left for these prompts (with --resume), else none.

    Without --resume, rows of an interrupted run are never dropped silently: the
    command refuses until it is told to --resume or --overwrite them.
    """
    from hsd_jax.io import partial_path, read_jsonl_rows, read_settings

    partial = partial_path(args.output)
    if args.overwrite:
        return []
    if not args.resume:
        if _holds_rows(partial):
            raise HsdError(f"{partial} holds the rows of an interrupted run; pass --resume to continue it "
                           "or --overwrite to start over")
        if _holds_rows(args.output):  # a finished run's rows are not replaced by a rerun's silently either
            raise HsdError(f"{args.output} holds the rows of an earlier run; pass --overwrite to replace them, "
                           "or choose another --output")
        return []
    source = partial if _holds_rows(partial) else args.output
    if not source.exists():  # nothing to resume: start from the first prompt, and say so
        print(f"no earlier run in {args.output} (nor {partial.name}); starting from the first prompt",
              file=sys.stderr, flush=True)
        return []
    rows = read_jsonl_rows(source, torn_tail=source == partial)  # a crash inside a write can cut its last line
    fix = "choose another --output, or pass --overwrite instead of --resume to start over"
    before = read_settings(args.output) if source == partial else None  # a finished file keeps none
    changed = [k for k in before or {} if before[k] != _settings(args).get(k)]
    if changed:  # rows made two ways would read as one run's
        diffs = "; ".join(f"{k}: {before[k]!r} then, {_settings(args).get(k)!r} now" for k in changed)
        raise HsdError(f"--resume must repeat the options of the interrupted run in {partial} ({diffs}); "
                       "pass the same options, or --overwrite to start over")
    if len(rows) > len(prompts):
        raise HsdError(f"{source} holds {len(rows)} rows but there are only {len(prompts)} prompts, "
                       f"so it belongs to another input; {fix}")
    for n, (row, prompt) in enumerate(zip(rows, prompts), 1):
        if row.get("prompt") != prompt:
            raise HsdError(f"{source}:{n} is the row for prompt {row.get('prompt')!r}, but prompt {n} is "
                           f"{prompt!r}, so it belongs to another input; {fix}")
    return rows


def _settings(args: argparse.Namespace) -> dict:
    """The options that shape the rows (not --batch-size or --mode: they give the same tokens)."""
    model = Path(args.model)
    return {"model": str(model.resolve()) if model.exists() else args.model, "schedule": args.schedule,
            "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens,
            "length_penalty": args.length_penalty, "early_stopping": args.early_stopping,
            "no_eos": args.no_eos, "dtype": args.dtype, "draft": args.draft,
            "num_draft_tokens": args.num_draft_tokens}


def _holds_rows(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _rows(prompts: list[str], g) -> list[dict]:
    return [
        {"prompt": p, "text": text, "tokens": seq, "layers_per_token": per_token,
         "avg_layers": sum(per_token) / len(per_token)}
        for p, text, seq, per_token in zip(prompts, g.texts, g.sequences, g.layers_per_token)
    ]


def _print_rows(rows: list[dict], as_json: bool, keep_going: bool = False) -> bool:
    """Prints the rows; False once the reader has gone (`| head`) and `keep_going` says the
    rows still have a file to go to, so decoding carries on instead of ending unfinished."""
    try:
        for r in rows:
            if as_json:
                print(json.dumps(r, ensure_ascii=False))
            else:
                print(f"--- {r['prompt']!r}\n{r['text']}\n    layers per token: {r['layers_per_token']}")
        sys.stdout.flush()  # a row printed is a row the reader has, even if a later batch fails
    except BrokenPipeError:
        if not keep_going:
            raise
        from hsd_jax.cli import stdout_to_devnull

        stdout_to_devnull()
        return False
    return True


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, like the command's errors (no source line under them)."""
    print(f"hsd-jax generate: warning: {message}", file=sys.stderr)


# --- the command -------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from hsd_jax import distributed
    from hsd_jax.io import JsonlAppender, check_output_file, lock_path, output_lock, partial_path, settings_path

    if (args.resume or args.overwrite) and not args.output:
        raise HsdError("--resume and --overwrite act on the rows in --output; give --output too")
    if args.batch_size < 1:
        raise HsdError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.devices is not None and args.devices < 1:
        raise HsdError(f"--devices must be at least 1, got {args.devices}; leave it out to use every device")
    if args.prompt:
        for n, prompt in enumerate(args.prompt, 1):  # counted from 1, as the user wrote them
            if not prompt.strip():
                raise HsdError(f"--prompt number {n} of {len(args.prompt)} is "
                               f"{'empty' if not prompt else 'only whitespace'}; every prompt needs text")
    sources = args.prompt if args.prompt else read_prompts(args.input_file, args.field)
    prompts = sources  # what the rows name (with --seq2seq, the text the model is given)
    if args.seq2seq:
        from hsd_jax.data import format_source

        prompts = [format_source(p) for p in sources]
    distributed.maybe_initialize()  # a launcher's several processes (docs/multihost.md); before JAX's devices
    distributed.local_devices(args.devices)  # too many: said now, not after the model has loaded
    if args.prompt and not distributed.is_lead():
        return 0  # a handful of prompts is one batch: process 0 decodes it
    out = None
    decoded = []  # the rows decoded so far (an interrupt message says whether there were any)
    held = contextlib.ExitStack()  # the output's lock, held until the command ends

    def open_output() -> int:  # before the model loads: a bad path must not cost a decode
        nonlocal out
        for path in (args.output, partial_path(args.output), settings_path(args.output), lock_path(args.output)):
            check_output_file(path, inputs=[args.input_file])
        # Before the rows are read: a second run into this output is refused, not mixed with the first.
        held.enter_context(output_lock(lock_path(args.output), args.output, what="generate run"))
        out = JsonlAppender(args.output, _earlier_rows(args, prompts), settings=_settings(args))
        return out.count

    with held, warnings.catch_warnings():
        # Only process 0 reads and writes the output; the others learn where it left off.
        done = distributed.lead_decides("generate-output", open_output) if args.output else 0
        warnings.showwarning = _show_warning
        try:
            with distributed.together("generate"):
                return _decode(args, sources, prompts, out, done, decoded)
        except KeyboardInterrupt:
            text = _interrupted(out, len(prompts), len(decoded)) if distributed.is_lead() else \
                f"interrupted (process {distributed.process_index()}); process 0 keeps the rows it has written"
            print(f"hsd-jax generate: {text}", file=sys.stderr)
            return INTERRUPTED
        except (HsdError, OSError) as err:  # e.g. a full disk after some batches: say what is safe
            if out is not None and out.written and not isinstance(err, BrokenPipeError):
                text = os_error_text(err) if isinstance(err, OSError) else str(err)
                raise HsdError(f"{text} ({_safe_rows(out, len(prompts))})") from err
            raise


def _decode(args: argparse.Namespace, sources: list[str], prompts: list[str], out, done: int, decoded: list) -> int:
    """Decodes prompts[done:] (made from `sources`, the prompts as given); `out` is None without
    --output and on processes other than 0. `decoded` gets the rows as they come."""
    import hsd_jax
    from hsd_jax import distributed
    from hsd_jax.generate import iter_batches

    if done == len(prompts):
        if out is not None:
            print(f"{args.output} already holds all {done} rows; nothing to decode", file=sys.stderr)
            out.finish()
        return 0
    lm = hsd_jax.load(args.model, dtype=args.dtype, layout="decode")  # it only decodes: no stacked copy
    if lm.tokenizer is None:
        raise HsdError(f"{args.model} has no tokenizer files; generate needs them to encode text prompts")
    options = dict(
        schedule=args.schedule, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, mode=args.mode,
        length_penalty=args.length_penalty,
        early_stopping={"true": True, "false": False, "never": "never"}[args.early_stopping],
    )
    if args.no_eos:
        options["eos_token_id"] = None
    if args.draft is not None or args.num_draft_tokens is not None:
        options.update(draft=args.draft, num_draft_tokens=args.num_draft_tokens)

    ids = [[]] * done + _encode(args, lm, sources, done)
    if args.prompt:  # a handful of prompts: one batch, exactly as given
        batches = [(done, hsd_jax.generate(lm, input_ids=ids[done:], devices=args.devices, **options))]
    else:  # over several processes, the others' batches come to process 0 (and only there)
        batches = iter_batches(lm, ids, batch_size=args.batch_size, start=done, devices=args.devices,
                               split_processes=True, **options)
    rows, parts = [], []
    printing = not args.output or args.json
    for start, g in batches:
        new = _rows(prompts[start:], g)
        if out is not None:
            out.append(new)
        if printing:
            printing = _print_rows(new, args.json, keep_going=out is not None)
        rows += new
        decoded.extend(new)
        parts.append(g)
    if out is not None:
        out.finish()
    if parts:  # process 0's: the others hand it their rows
        _summary(args, lm, parts, rows, done, 1 if args.prompt else distributed.process_count())
    return 0


def _encode(args: argparse.Namespace, lm, sources: list[str], done: int) -> list[list[int]]:
    """Token ids of sources[done:], each checked against the model's context (with
    --max-new-tokens) before anything is decoded, or cut to it with --truncate-sources:
    eval's rule, in `encode_source`, which also refuses a huge line without tokenizing it all."""
    from hsd_jax.data import encode_source

    room = lm.config.max_position - args.max_new_tokens
    if room < 1 + args.seq2seq:  # a token of prompt, and the separator
        raise HsdError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                       f"{lm.config.max_position}-token context; lower it")
    fix = ("shorten it, lower --max-new-tokens, or pass --truncate-sources to cut long prompts from their end "
           "(nothing was decoded)")
    return [encode_source(lm.tokenizer, source, room, cut=args.truncate_sources, separator=args.seq2seq, fix=fix,
                          where=f"prompt {n} of {len(sources)}")
            for n, source in enumerate(sources[done:], done + 1)]


def _summary(args: argparse.Namespace, lm, parts: list, rows: list[dict], done: int, processes: int = 1) -> None:
    layers = sum(sum(r["layers_per_token"]) for r in rows)
    tokens = sum(len(r["tokens"]) for r in rows)
    seconds = sum(g.decode_seconds for g in parts)  # over several processes, summed over them
    resumed = f" (+{done} resumed)" if done else ""
    devices = max(g.devices for g in parts)
    where = f"{devices} device{'s' if devices > 1 else ''}"
    if processes > 1:
        where = f"{processes} processes x {where}"
    rate = f"{tokens / seconds if seconds > 0 else float('nan'):.1f} tokens/s"
    summary = (f"schedule {parts[0].schedule} | {len(rows)} prompts{resumed}, {tokens} tokens | "
               f"Avg. Layer {layers / tokens:.2f} of {lm.config.num_layers} | "
               f"{rate}{' per process' if processes > 1 else ''} (compile excluded) | {where}")
    if parts[0].draft is not None:  # speculative: how the rounds went, over every batch
        stats = {key: sum(g.draft_stats[key] for g in parts) for key in parts[0].draft_stats}
        summary += (f" | draft {parts[0].draft}, k={parts[0].num_draft_tokens}: acceptance "
                    f"{stats['accepted'] / max(stats['drafted'], 1):.2f}, "
                    f"{stats['round_tokens'] / max(stats['rounds'], 1):.2f} tokens per round")
    stream = sys.stderr if args.json else sys.stdout
    print(summary, file=stream)
    if args.output:
        print(f"wrote {args.output}", file=stream)


def _safe_rows(out, total: int) -> str:
    where = out.partial if out.written or _holds_rows(out.partial) else out.path
    return f"{out.count} of {total} rows are safe in {where}; rerun the same command with --resume to continue"


def _interrupted(out, total: int, decoded: int) -> str:
    if out is None:
        if not decoded:
            return "interrupted before any prompt was decoded; nothing was printed"
        return ("interrupted; the rows printed above are all there is (with --output FILE, rows are "
                "saved as batches finish and --resume continues)")
    if out.count == 0:
        return "interrupted before the first batch finished; nothing was written"
    return f"interrupted: {_safe_rows(out, total)}"
