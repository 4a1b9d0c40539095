"""How often a layer-skip draft agrees with the full model, and the speedup that implies
where a verify pass costs one decode step (a GPU at small batch): hardware-independent
figures of lossless self-speculative decoding (`hsd_jax.speculative`), for one or more
models side by side.

    python eval/speculative_acceptance.py --models plain=runs/a schedule-aware=runs/b \
        --drafts hsd:s=2,min=0,max=4 hsd:s=2,min=0,max=1 --k 1 2 3 4 \
        --dataset common_gen --split test --output eval/results/commongen_test/speculative

Each input is decoded greedily on its own (batch 1: a batch shares one cache index and so
keeps only the least-agreeing row's drafts), `--max-new-tokens` new tokens. Per model, draft
and k: the acceptance rate (each round's agreeing prefix over the k drafted tokens), tokens
kept per round (1 .. k + 1: the tokens each input kept after its first, which the prompt pass
makes, over the rounds), the draft's Avg. Layer c (measured by decoding the same inputs under
the draft schedule) and the implied speedup over vanilla greedy, tokens / (inputs + rounds x
(1 + k c / L)): vanilla spends one step a token; here the prompt pass makes each input's first
token, and a round costs k draft steps of c of the L layers each and one verify pass at the
cost of a step. (The library's own `tokens_per_round` also counts the tokens a last round
made past EOS or the token limit, which are cut.)
Writes speculative.json and speculative.md into --output (atomically); no timing, so the
figures do not depend on the machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/_cli.py, when imported from elsewhere
from _cli import Parser  # noqa: E402


def measure(lm, prompts: list[list[int]], draft: str, k: int, max_new_tokens: int) -> dict:
    """Acceptance counts summed over every prompt, each decoded alone."""
    from hsd_jax.generate import generate

    totals = {"rounds": 0, "drafted": 0, "accepted": 0, "round_tokens": 0, "tokens": 0, "inputs": len(prompts)}
    for row in tqdm(prompts, desc=f"{draft} k={k}", leave=False, dynamic_ncols=True):
        out = generate(lm, [row], draft=draft, num_draft_tokens=k, max_new_tokens=max_new_tokens,
                       pad_to_multiple_of=8)
        for key in ("rounds", "drafted", "accepted", "round_tokens"):
            totals[key] += int(out.draft_stats[key])
        totals["tokens"] += out.num_tokens
    return totals


def draft_layers(lm, prompts: list[list[int]], draft: str, max_new_tokens: int) -> float:
    """The draft schedule's Avg. Layer on these prompts (greedy, batched: the schedule alone
    decides which layers run, so batching does not change it)."""
    from hsd_jax.generate import generate_batched

    out = generate_batched(lm, prompts, batch_size=32, schedule=draft, max_new_tokens=max_new_tokens,
                           desc=f"{draft} alone")
    return out.avg_layers


def implied(t: dict, k: int, c: float, L: int) -> dict:
    """Acceptance, tokens kept per round and the speedup they imply at one-step verify (module doc)."""
    return {"acceptance_rate": t["accepted"] / t["drafted"],
            "tokens_per_round": (t["tokens"] - t["inputs"]) / t["rounds"],
            "implied_speedup": t["tokens"] / (t["inputs"] + t["rounds"] * (1 + k * c / L))}


def table(rows: list[dict]) -> str:
    head = ["model", "draft", "draft layers", "k", "acceptance", "tokens/round", "implied speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['model']} | `{r['draft']}` | {r['draft_layers']:.2f} of {r['num_layers']} | {r['k']} | "
                     f"{100 * r['acceptance_rate']:.1f}% | {r['tokens_per_round']:.2f} | "
                     f"{r['implied_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = Parser(__file__, description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, metavar="LABEL=PATH")
    p.add_argument("--drafts", nargs="+", required=True, metavar="SPEC")
    p.add_argument("--k", nargs="+", type=int, default=[1, 2, 3, 4])
    data = p.add_mutually_exclusive_group()
    data.add_argument("--dataset", default="common_gen", help="a named dataset (default: common_gen)")
    data.add_argument("--eval-file", type=Path, help="or a local file of sources (.jsonl/.json/.csv/.tsv)")
    p.add_argument("--source-field", help="the source field of --eval-file (default: source)")
    p.add_argument("--split", default="test", help="the split of --dataset (default: test; validation:report "
                   "for the report half, docs/holdout.md)")
    p.add_argument("--limit", type=int, help="the first N inputs only (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)

    import hsd_jax
    from hsd_jax.data import encode_source, load_dataset_sources, read_sources
    from hsd_jax.io import write_json, write_text

    models = []
    for item in args.models:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            sys.exit(f"speculative_acceptance.py: --models takes LABEL=PATH, got {item!r}")
        models.append((label, path))
    if any(k < 1 for k in args.k):
        sys.exit(f"speculative_acceptance.py: every --k must be at least 1, got {args.k}")
    if args.eval_file:
        sources = list(dict.fromkeys(read_sources(args.eval_file, args.source_field)))[: args.limit]
    else:
        sources = load_dataset_sources(args.dataset, args.split)[: args.limit]
    rows = []
    for label, path in models:
        lm = hsd_jax.load(path, layout="decode")
        room = lm.config.max_position - args.max_new_tokens
        prompts = [encode_source(lm.tokenizer, s, room) for s in sources]
        L = lm.config.num_layers
        for draft in args.drafts:
            c = draft_layers(lm, prompts, draft, args.max_new_tokens)
            for k in args.k:
                t = measure(lm, prompts, draft, k, args.max_new_tokens)
                rows.append({"model": label, "path": str(path), "draft": draft, "k": k, "num_layers": L,
                             "draft_layers": c, **t, **implied(t, k, c, L)})
                print(table(rows[-1:]).splitlines()[-1], flush=True)
                args.output.mkdir(parents=True, exist_ok=True)
                data_name = {"eval_file": str(args.eval_file)} if args.eval_file else \
                    {"dataset": args.dataset, "split": args.split}
                record = {**data_name, "num_inputs": len(sources),
                          "max_new_tokens": args.max_new_tokens, "rows": rows}
                write_json(args.output / "speculative.json", record)
                write_text(args.output / "speculative.md", table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
