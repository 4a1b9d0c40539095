"""Weight-space interpolation of a fine-tuned model towards the model it was tuned from:
theta = a x BASE + (1 - a) x TUNED (WiSE-FT, Wortsman et al. 2022). A probe of how much of a
fine-tune's cost to vanilla decoding comes back with a share of the base weights, and what
that share does to decoding with layers skipped.

    python eval/interpolate_weights.py --base runs/cg/plain --tuned runs/cg/schedule_aware/stage4 \
        --base-weight 0.1 --output runs/cg/wise-0.1

Writes a Hugging Face folder (TUNED's config and tokenizer with the mixed weights) that every
command loads. The two models must have the same architecture and shapes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/_cli.py, when imported from elsewhere
from _cli import Parser  # noqa: E402


def interpolate(base, tuned, base_weight: float):
    """TUNED's model with its weights replaced by base_weight x BASE's + (1 - base_weight) x its own."""
    import jax

    from hsd_jax.errors import HsdError

    if not 0.0 <= base_weight <= 1.0:
        raise HsdError(f"--base-weight must be between 0 and 1, got {base_weight}")
    if base.config != tuned.config:
        raise HsdError("the two models differ in architecture (config.json); interpolate a fine-tune with the "
                       "model it was tuned from")
    mixed = jax.tree.map(lambda b, t: (base_weight * b + (1.0 - base_weight) * t).astype(t.dtype),
                         base.params, tuned.params)
    tuned.set_params(mixed)
    return tuned


def main(argv: list[str] | None = None) -> int:
    p = Parser(__file__, description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the model fine-tuned from (folder or hub id)")
    p.add_argument("--tuned", required=True, help="the fine-tuned model; its config and tokenizer are kept")
    p.add_argument("--base-weight", type=float, required=True, metavar="A", help="the base's share, 0 to 1")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)

    import hsd_jax
    from hsd_jax.errors import HsdError, os_error_text
    from hsd_jax.io import check_output_dir

    try:
        check_output_dir(args.output)
        model = interpolate(hsd_jax.load(args.base, tokenizer=False), hsd_jax.load(args.tuned), args.base_weight)
        hsd_jax.save_pretrained(model, args.output)  # each file written whole, then renamed
    except (HsdError, OSError) as err:  # one line, as hsd-jax's own errors
        print(f"{p.prog}: error: {err if isinstance(err, HsdError) else os_error_text(err)}", file=sys.stderr)
        return 2
    print(f"{args.output}: {args.base_weight:g} x {args.base} + {1 - args.base_weight:g} x {args.tuned}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
