"""`hsd-jax schedule`: show which layers a schedule runs at each decode step."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from hsd_jax.errors import HsdError
from hsd_jax.io import atomic_path

# Text heat map cells, indexed by hsd_jax.schedules RUN / PROPAGATE / SKIP.
CELLS = ("█", "▒", "·")
MAX_ROWS = 40  # print at most this many steps, so the map fits a terminal


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "schedule",
        help="show a layer-skip schedule (spec, preset or .npy mask) as a heat map",
        description="Print which layers each decode step runs, the nominal average layers, "
        "whether the schedule is nested and how many KV cache cells need state propagation. "
        "SPEC is e.g. 'hsd:s=1,min=0,max=20', a preset name (see --list) or a .npy mask.",
    )
    parser.add_argument("spec", nargs="?", metavar="SPEC", help="schedule spec, preset name or mask file; 'list' lists the presets")
    parser.add_argument("--layers", type=int, metavar="L", help="number of transformer layers of the model (36 for GPT-2 large, 32 for Phi-2)")
    parser.add_argument("--steps", type=int, metavar="T", help="number of decode steps (max new tokens)")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also write the heat map as a PNG image")
    parser.add_argument("--json", action="store_true", help="print the schedule as JSON instead of a heat map")
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hsd_jax import schedules  # numpy: imported here so `hsd-jax --help` stays fast

    if args.list or args.spec == "list":
        return _print_presets(schedules.preset_infos())
    if args.spec is None:
        raise HsdError("give a SPEC (e.g. 'hsd:s=1,min=0,max=20' or a preset; --list shows them)")
    if args.layers is None or args.steps is None:
        raise HsdError("give the model's number of layers and the decode steps, e.g. --layers 36 --steps 72")

    resolved = schedules.resolve(args.spec, num_layers=args.layers, max_new_tokens=args.steps)
    if isinstance(resolved, schedules.CalmConfig):
        if args.plot:
            raise HsdError(f"{resolved.name} decides its exit layers at run time, so there is no schedule to plot")
        return _print_calm(resolved, args.steps, as_json=args.json)

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


def _plot(sched, path: Path) -> None:
    """Write the heat map as a PNG, atomically: a reader never sees half a file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    # A bare Figure with the Agg canvas: no pyplot, so no global backend is touched.
    fig = Figure(figsize=(max(4.0, sched.num_layers * 0.18), max(3.0, min(sched.max_new_tokens, 200) * 0.06)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colors = ["#1f4e79", "#e39b2d", "#f2f2f2"]  # run, propagate KV, skip
    ax.imshow(sched.layer_ops(), cmap=ListedColormap(colors), vmin=0, vmax=2, aspect="auto", interpolation="nearest")
    labels = ["run", "skip, KV by state propagation", "skip"]
    handles = [Patch(facecolor=c, edgecolor="grey", label=label) for c, label in zip(colors, labels)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize="small", frameon=False)
    ax.set_xlabel("layer")
    ax.set_ylabel("decode step")
    ax.set_title(f"{sched.name}: {sched.avg_layers:.2f} layers/step")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
