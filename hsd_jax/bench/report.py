"""The results as tables: plain text (`format_table`) or rich tables on a wide enough terminal
(`print_table`), one table per case, with the rows and header of its kind, then the
figures against their targets.
"""

from __future__ import annotations

from hsd_jax.bench.calm import CALM_HEADER
from hsd_jax.bench.common import NOISY
from hsd_jax.bench.schedules import HEADER, case_rows, control_flow_line
from hsd_jax.bench.speculative import SPECULATIVE_HEADER


def _header(rec: dict) -> list[str]:
    return {"speculative": SPECULATIVE_HEADER, "calm": CALM_HEADER}.get(rec.get("kind"), HEADER)


def _by_int(item) -> int:
    return int(item[0])  # JSON keys are strings: "10" after "9"


def _case_title(rec: dict) -> str:
    if rec.get("skipped"):
        return rec["label"]
    if rec.get("kind") == "calm":
        w = rec["weights"]
        return (f"{rec['label']}: LM head {w['head_bytes'] / 2**20:.1f} MiB = {w['head_over_layer']:.1f} layers' "
                f"weights")
    if rec.get("kind") == "speculative":
        c = rec["costs"]
        forms = "; ".join(f"{form} " + ", ".join(f"{t}: {ms:.2f}" for t, ms in sorted(by_t.items(), key=_by_int))
                          for form, by_t in c["verify_ms"].items())
        return (f"{rec['label']}: one-token step {c['step_ms']:.2f} ms; verify pass over T positions, ms by T: "
                f"{forms} (the runs used {c['verify_form']})")
    bw, peak = rec["bandwidth"], rec.get("hbm_peak_bytes_per_second")
    return (f"{rec['label']}: bandwidth {bw['bytes_per_second'] / 1e9:.2f} GB/s ({bw['probe']}), "
            f"roofline {rec['roofline_tokens_per_second']:.2f} tok/s"
            + (f", HBM peak {peak / 1e12:.2f} TB/s" if peak else ""))


def _title(result: dict) -> str:
    env = result["environment"]
    line = f"hsd-jax bench: {result['suite']} on {env['device']}, medians of {result['repeats']}"
    if "threads" in env:  # both frameworks were given this many (`apply_threads`)
        xla = env.get("xla_threads") or "not set: its backend had started"
        line += f"; threads: {env['threads']} (XLA CPU {xla}, PyTorch {env.get('torch_threads') or '-'})"
    return line


def _notes(rec: dict) -> list[str]:
    flow = control_flow_line(rec)
    return rec.get("notes", []) + ([flow] if flow else [])


def format_table(result: dict) -> str:
    """The results as plain text: one table per case, then the figures against their targets."""
    lines = [_title(result)]
    for rec in result["cases"]:
        lines += ["", _case_title(rec)]
        lines += [f"  {note}" for note in _notes(rec)]
        if not rec["runs"]:
            continue
        header = _header(rec)
        rows = [header] + case_rows(rec)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for n, row in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                          for i, (c, w) in enumerate(zip(row, widths))).rstrip())
            if n == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
    if _any_noisy(result):
        lines += ["", _NOISY_NOTE]
    if result.get("targets"):
        lines += ["", "targets:"] + ["  " + _target_line(f) for f in result["targets"]]
    return "\n".join(lines)


_NOISY_NOTE = (f"* its slowest round took over {NOISY}x its fastest: the machine was busy; "
               "the rounds are in the JSON (`seconds`)")


def _any_noisy(result: dict) -> bool:
    return any(r.get("spread", 1.0) > NOISY for rec in result["cases"] for r in rec.get("runs", []))


def _target_line(f: dict) -> str:
    """One target's figure as the report prints it, e.g. "...: 1.42x, target 2.00x (71% of it)"."""
    def show(x):
        return f"{100 * x:.0f}%" if f["unit"] == "%" else f"{x:.2f}{f['unit']}"

    return f"{f['name']}: {show(f['value'])}, target {show(f['target'])} ({100 * f['of_target']:.0f}% of it)"


def print_table(result: dict) -> None:
    """Rich tables on a terminal wide enough for every number; else `format_table`, whose
    plain lines a log, a pipe or a narrow terminal keeps whole (rich would cut columns)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_table(result))
        return
    console = Console()
    tables = [_rich_table(rec, Table) for rec in result["cases"]]
    unbounded = console.options.update_width(1 << 20)  # console.measure alone stops at the console width
    too_wide = any(console.measure(t, options=unbounded).minimum > console.width for t in tables)
    if not console.is_terminal or too_wide:
        print(format_table(result))
        return
    console.print(_title(result), markup=False)
    for rec, table in zip(result["cases"], tables):
        console.print(table)
        for note in _notes(rec):
            console.print(f"  {note}", markup=False)
    if _any_noisy(result):
        console.print(_NOISY_NOTE, markup=False)
    if result.get("targets"):
        console.print("targets:", markup=False)
    for f in result.get("targets", []):
        console.print("  " + _target_line(f), markup=False)


def _rich_table(rec: dict, table_type):
    """A case's rich table: headers and the schedule may fold onto more lines, a number
    keeps its whole width."""
    table = table_type(title=_case_title(rec), title_justify="left")
    rows = case_rows(rec)
    for i, h in enumerate(_header(rec)):
        widest = max((len(r[i]) for r in rows), default=0)
        table.add_column(h, justify="left" if h in ("runner", "schedule", "draft, k") else "right", overflow="fold",
                         min_width=None if h in ("schedule", "draft, k") else widest)
    for row in rows:
        table.add_row(*row)
    return table
