"""`hsd-jax schedule`: show which layers a schedule runs at each decode step."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from hsd_jax.commands import DefaultsShown
from hsd_jax.errors import HsdError
from hsd_jax.io import atomic_path, check_output_file

# Text heat map cells, indexed by hsd_jax.schedules RUN / PROPAGATE / SKIP.
CELLS = ("█", "▒", "·")
MAX_ROWS = 40  # print at most this many steps, so the map fits a terminal
MAX_CELLS = 10**8  # steps x layers; ~15 s and 0.7 GB here, where a typo's 10**10 would exhaust memory


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "schedule",
        help="show a layer-skip schedule (spec, preset or .npy mask) as a heat map",
        description="Print which layers each decode step runs, the nominal average layers, "
        "whether the schedule is nested and how many KV cache cells need state propagation. "
        "SPEC is e.g. 'hsd:s=1,min=0,max=20', a preset name (see --list) or a .npy mask.",
        formatter_class=DefaultsShown,
    )
    parser.add_argument("spec", nargs="?", metavar="SPEC", help="schedule spec, preset name or mask file; 'list' lists the presets")
    parser.add_argument("--layers", type=int, metavar="L", help="number of transformer layers of the model, "
                        "e.g. 36 for GPT-2 large, 32 for Phi-2 (default: a mask file's column count)")
    parser.add_argument("--steps", type=int, metavar="T", help="number of decode steps (max new tokens) "
                        "(default: a mask file's row count)")
    parser.add_argument("--plot", type=Path, metavar="IMAGE", help="also write the heat map as an image; "
                        "its extension picks the format (.png, .jpg, .svg, .pdf, ...) (default: none)")
    parser.add_argument("--json", action="store_true", help="print the schedule as JSON instead of a heat map")
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hsd_jax import schedules  # numpy: imported here so `hsd-jax --help` stays fast

    if args.list or args.spec == "list":
        return _print_presets(schedules.preset_infos())
    if args.spec is None:
        raise HsdError("give a SPEC (e.g. 'hsd:s=1,min=0,max=20' or a preset; --list shows them)")
    if args.plot:  # before any work: a bad name or path fails at once
        _image_format(args.plot)
        check_output_file(args.plot, flag="--plot")
    steps, layers = args.steps, args.layers
    if _is_mask(args.spec) and (steps is None or layers is None):
        mask_steps, mask_layers = _mask_shape(args.spec)
        steps = mask_steps if steps is None else steps
        layers = mask_layers if layers is None else layers
    if layers is None or steps is None:
        raise HsdError("give the model's number of layers and the decode steps, e.g. --layers 36 --steps 72")
    for flag, value in (("--layers", layers), ("--steps", steps)):
        if value < 1:  # named as the user wrote it, before schedules' own num_layers / max_new_tokens check
            raise HsdError(f"{flag} must be at least 1, got {value}")
    if layers * steps > MAX_CELLS:
        raise HsdError(f"--layers {layers} x --steps {steps} is {layers * steps:,} cells, more than the "
                       f"{MAX_CELLS:,} a schedule is shown for; give the model's depth and a decode length")

    resolved = schedules.resolve(args.spec, num_layers=layers, max_new_tokens=steps)
    if isinstance(resolved, schedules.CalmConfig):
        if args.plot:
            raise HsdError(f"{resolved.name} decides its exit layers at run time, so there is no schedule to plot")
        return _print_calm(resolved, steps, as_json=args.json)

    sched = resolved
    if args.json:
        print(json.dumps(_summary(sched) | {"mask": sched.mask.astype(int).tolist()}))
    else:
        print(_heat_map(sched))
        for key, value in _summary(sched).items():
            print(f"{key + ':':<20} {value}")
    if args.plot:
        _plot(sched, args.plot)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


def _is_mask(spec: str) -> bool:
    return spec.startswith("mask:") or spec.endswith(".npy")


def _mask_shape(spec: str) -> tuple[int, int]:
    """(steps, layers) of a .npy mask, read from its header only."""
    import numpy as np

    path = spec.removeprefix("mask:")
    if not Path(path).is_file():
        raise HsdError(f"mask file {path} does not exist; give a .npy file holding a bool [steps, layers] array")
    try:
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
    except (OSError, ValueError) as err:
        raise HsdError(f"cannot read the mask file {path} as a .npy array: {err}") from None
    if len(shape) != 2:
        raise HsdError(f"mask file {path} holds a {len(shape)}-D array; a mask is 2-D, [steps, layers]")
    return shape


def _summary(sched) -> dict:
    return {
        "name": sched.name,
        "spec": sched.spec,
        "layers": sched.num_layers,
        "steps": sched.max_new_tokens,
        "avg_layers": round(sched.avg_layers, 4),
        "nested": sched.is_nested,
        "kv_propagate_cells": int(sched.needs_kv.sum()),
        "segments": len(sched.segments()),
    }


def _heat_map(sched) -> str:
    """Rows = steps, columns = layers; every k-th step when there are more than MAX_ROWS."""
    ops = sched.layer_ops()
    steps, layers = ops.shape
    every = math.ceil(steps / MAX_ROWS)
    width = len(str(steps - 1))
    pad = " " * (width + 4)
    lines = [
        f"{sched.name}: {sched.spec}",
        f"{CELLS[0]} run   {CELLS[1]} skip, KV filled by state propagation   {CELLS[2]} skip",
    ]
    if every > 1:
        lines.append(f"(one step in every {every} shown: t = 0, {every}, {2 * every}, ... of {steps} steps)")
    lines.append(pad + "".join(str(l // 10) if l % 10 == 0 else " " for l in range(layers)) + "  layer")
    lines.append(pad + "".join(str(l % 10) for l in range(layers)))
    for t in range(0, steps, every):
        row = "".join(CELLS[op] for op in ops[t])
        lines.append(f"t={t:>{width}} |{row}| {sched.layers_per_step[t]}")
    return "\n".join(lines)


def _print_calm(calm, steps: int, *, as_json: bool) -> int:
    thresholds = calm.thresholds(steps)
    info = {
        "name": calm.name,
        "spec": calm.spec,
        "dynamic": True,
        "min_exit": calm.min_exit,
        "threshold_first": float(thresholds[0]),
        "threshold_last": float(thresholds[-1]),
    }
    if as_json:
        print(json.dumps(info))
        return 0
    print(f"{calm.name}: {calm.spec}")
    print("CALM picks each step's exit layer at run time from the model's confidence; it has no static mask.")
    print(f"exit threshold: {thresholds[0]:.4f} at step 0, falling to {thresholds[-1]:.4f} at step {steps - 1}")
    return 0


def _print_presets(infos: dict) -> int:
    width = max(map(len, infos), default=0)
    for name, info in infos.items():
        print(f"{name:<{width}}  {info['spec']}")
    return 0


# Formats the Agg canvas writes itself (pgf needs a LaTeX install).
_NEEDS_TOOLS = {"pgf"}


def _image_format(path: Path) -> str:
    """The image format `path`'s extension names; an HsdError when matplotlib cannot write it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = [f for f in FigureCanvasAgg.get_supported_filetypes() if f not in _NEEDS_TOOLS]
    suffix = path.suffix.lower().removeprefix(".")
    if suffix not in formats:
        raise HsdError(f"--plot {path}: {'.' + suffix if suffix else 'no extension'} is not an image format "
                       f"matplotlib writes; end the name with one of {', '.join('.' + f for f in formats)}")
    return suffix


def _plot(sched, path: Path) -> None:
    """Write the heat map as an image, atomically: a reader never sees half a file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    # A bare Figure with the Agg canvas: no pyplot, so no global backend is touched. The
    # constrained layout keeps the legend in a row of its own below the axis label.
    fig = Figure(figsize=(max(4.0, sched.num_layers * 0.18), max(3.0, min(sched.max_new_tokens, 200) * 0.06)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colors = ["#1f4e79", "#e39b2d", "#f2f2f2"]  # run, propagate KV, skip
    ax.imshow(sched.layer_ops(), cmap=ListedColormap(colors), vmin=0, vmax=2, aspect="auto", interpolation="nearest")
    labels = ["run", "skip, KV by state propagation", "skip"]
    handles = [Patch(facecolor=c, edgecolor="grey", label=label) for c, label in zip(colors, labels)]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize="small", frameon=False)
    ax.set_xlabel("layer")
    ax.set_ylabel("decode step")
    ax.set_title(f"{sched.name}: {sched.avg_layers:.2f} layers/step")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=_image_format(path), dpi=100, bbox_inches="tight")
