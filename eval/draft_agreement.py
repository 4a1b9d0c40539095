"""How often a k = 1 self-speculative draft picks the full model's token, split by how sure
the full model is of that token: whether a draft's acceptance is limited by the draft or by
how close the full model's own call is.

    python eval/draft_agreement.py --model runs/cg/schedule_aware_views/stage4 \
        --drafts hsd:s=2,min=0,max=1,T=72 --split validation:selection --output runs/agreement

Each input is decoded greedily by the full model (`--max-new-tokens`, EOS kept). Then one
teacher-forced pass over prompt + continuation gives, at every generated position, the full
model's logits and the draft's (`models.draft_forward`: each position under the schedule
over the full model's K/V of the earlier positions, what `generate(draft=...)` computes at
k = 1). A position agrees when the two argmaxes are equal; it is binned by the full model's
probability of its own argmax. Beside it, the overlap sum_x min(p(x), q(x)) of the two
distributions: the chance that speculative *sampling* at temperature 1 accepts the draft's
token there, which credits a draft whose distribution matches where its argmax does not. The first generated token comes from the prefill and is not
drafted, so it is left out. The overall agreement approximates `speculative_acceptance.py`'s
k = 1 acceptance (that one drafts only every round's first position). Writes agreement.json
and agreement.md into --output (atomically).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/_cli.py, when imported from elsewhere
from _cli import Parser  # noqa: E402

BINS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0 + 1e-9)  # the full model's top-1 probability


def agreement(lm, prompts: list[list[int]], continuations: list[list[int]], mask: np.ndarray,
              batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(the full model's top-1 probability, whether the draft's argmax equals the full
    model's, the two distributions' overlap) at every drafted position of every input,
    concatenated; and the share of those
    positions where the teacher-forced full argmax is the greedy token decoded there (a
    check that the pass reproduces decoding: float sums may flip a near tie)."""
    import jax
    import jax.numpy as jnp

    from hsd_jax.models import draft_forward
    from hsd_jax.train import skip_aware_active

    @jax.jit
    def both(params, tokens, attention, active):
        full, draft = draft_forward(params, lm.config, tokens, attention, active)
        p, q = jax.nn.softmax(full), jax.nn.softmax(draft)
        return p.max(-1), full.argmax(-1), draft.argmax(-1), jnp.minimum(p, q).sum(-1)

    probs, agree, overlap, same = [], [], [], []
    width = max(len(p) + len(c) for p, c in zip(prompts, continuations))
    width = -(-width // 8) * 8  # one compiled shape for every batch
    L = lm.config.num_layers
    for start in range(0, len(prompts), batch_size):
        rows = list(zip(prompts, continuations))[start:start + batch_size]
        rows += [rows[-1]] * (batch_size - len(rows))  # pad the last batch; its copies are dropped below
        tokens = np.zeros((batch_size, width), np.int32)
        attention = np.zeros((batch_size, width), bool)
        targets = np.zeros((batch_size, width), bool)
        for b, (p, c) in enumerate(rows):
            tokens[b, :len(p) + len(c)] = p + c
            attention[b, :len(p) + len(c)] = True
            targets[b, len(p):len(p) + len(c)] = True
        active = skip_aware_active(mask, targets, L)
        top, full_arg, draft_arg, shared = (np.asarray(x) for x in both(lm.params, tokens, attention, active))
        for b, (p, c) in enumerate(rows[: min(batch_size, len(prompts) - start)]):
            # position i holds continuation token j = i - len(p) and predicts token j + 1
            pos = np.arange(len(p), len(p) + len(c) - 1)
            probs.append(top[b, pos])
            agree.append(full_arg[b, pos] == draft_arg[b, pos])
            overlap.append(shared[b, pos])
            same.append(full_arg[b, pos] == np.asarray(c[1:]))
    return (np.concatenate(probs), np.concatenate(agree), np.concatenate(overlap),
            float(np.concatenate(same).mean()))


def summary(probs: np.ndarray, agree: np.ndarray, overlap: np.ndarray) -> dict:
    bins = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        sel = (probs >= lo) & (probs < hi)
        bins.append({"low": lo, "high": min(hi, 1.0), "positions": int(sel.sum()),
                     "share": float(sel.mean()), "agreement": float(agree[sel].mean()) if sel.any() else None})
    return {"positions": int(len(probs)), "agreement": float(agree.mean()), "overlap": float(overlap.mean()),
            "mean_full_top1": float(probs.mean()), "bins": bins}


def table(rows: list[dict]) -> str:
    head = ["draft", "positions", "full pass = greedy", "agreement", "overlap", "mean top-1 p"] + \
        [f"p in [{lo:.1f}, {min(hi, 1.0):.1f}]: share, agreement" for lo, hi in zip(BINS[:-1], BINS[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['draft']}`", str(r["positions"]), f"{100 * r['full_argmax_is_greedy_token']:.1f}%",
                 f"{100 * r['agreement']:.1f}%", f"{100 * r['overlap']:.1f}%",
                 f"{r['mean_full_top1']:.2f}"]
        cells += [f"{100 * b['share']:.0f}%, " + ("-" if b["agreement"] is None else f"{100 * b['agreement']:.0f}%")
                  for b in r["bins"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = Parser(__file__, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--drafts", nargs="+", required=True, metavar="SPEC")
    p.add_argument("--dataset", default="common_gen", help="a named dataset (default: common_gen)")
    p.add_argument("--split", default="validation:selection",
                   help="its split (default: validation:selection, docs/holdout.md)")
    p.add_argument("--limit", type=int, help="the first N inputs only (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)

    import hsd_jax
    from hsd_jax.data import encode_source, load_dataset_sources
    from hsd_jax.generate import generate_batched
    from hsd_jax.io import write_json, write_text
    from hsd_jax.schedules import schedule

    sources = load_dataset_sources(args.dataset, args.split)[: args.limit]
    lm = hsd_jax.load(args.model)
    room = lm.config.max_position - args.max_new_tokens
    prompts = [encode_source(lm.tokenizer, s, room) for s in sources]
    # greedy on a copy in the decode layout, so lm keeps the stacked one draft_forward takes
    decoder = hsd_jax.load(args.model, layout="decode")
    continuations = generate_batched(decoder, prompts, batch_size=32, max_new_tokens=args.max_new_tokens,
                                     desc="vanilla greedy").sequences
    rows = []
    for spec in args.drafts:
        mask = schedule(spec, num_layers=lm.config.num_layers, max_new_tokens=args.max_new_tokens).mask
        probs, agree, overlap, reproduced = agreement(lm, prompts, continuations, mask)
        rows.append({"draft": spec, **summary(probs, agree, overlap), "full_argmax_is_greedy_token": reproduced})
        args.output.mkdir(parents=True, exist_ok=True)
        write_json(args.output / "agreement.json", {"model": str(args.model), "dataset": args.dataset,
                                                    "split": args.split, "num_inputs": len(sources),
                                                    "max_new_tokens": args.max_new_tokens, "rows": rows})
        write_text(args.output / "agreement.md", table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
