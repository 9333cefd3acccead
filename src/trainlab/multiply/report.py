"""The comparison report: a table in report.md and a plot of val exact-match by step."""

from __future__ import annotations

from pathlib import Path

from trainlab.engine.loop import Member, Summary
from trainlab.engine.monitor import format_duration
from trainlab.engine.plots import plot_lines
from trainlab.engine.tracking import Run

THRESHOLDS = (0.5, 0.9, 0.99)


def steps_to(member: Member, threshold: float) -> int | None:
    """First evaluated step whose val exact-match reached ``threshold``."""
    for e in member.evals:
        if e.get("exact_match", 0.0) >= threshold:
            return int(e["step"])
    return None


def member_row(m: Member) -> dict[str, str]:
    best = max((e.get("exact_match", 0.0) for e in m.evals), default=None)
    per_s = m.examples / m.train_seconds if m.train_seconds else 0.0
    row = {
        "model": m.name,
        "parameters": f"{m.num_parameters:,}",
        "steps": str(m.step),
        "train time": format_duration(m.train_seconds),
        "examples/s": f"{per_s:,.0f}",
        "best val exact-match": "n/a" if best is None else f"{best:.2%}",
        "exact-match per M params": "n/a" if best is None else f"{best / (m.num_parameters / 1e6):.3f}",
    }
    for t in THRESHOLDS:
        s = steps_to(m, t)
        row[f"steps to {t:.0%}"] = "not reached" if s is None else str(s)
    return row


def plot(members: list[Member], path: Path) -> bool:
    return plot_lines(path, [(f"{m.name} ({m.num_parameters / 1e6:.2f}M params)", [e["step"] for e in m.evals],
                              [100 * e.get("exact_match", 0.0) for e in m.evals]) for m in members],
                      "val exact-match (%)", ylim=(-2, 102))


def format_metric(name: str, value: float) -> str:
    """Rates as percentages; losses and anything else as plain numbers."""
    rate = name.startswith(("exact_match", "train_exact_match")) or name.endswith("accuracy")
    return f"{value:.2%}" if rate else f"{value:.4g}"


def write_report(run: Run, summary: Summary, test: dict[str, dict[str, float]] | None = None) -> Path:
    """``test``: each member's score on the held-out test set (``inference.evaluate_members``)."""
    rows = [member_row(m) for m in summary.members]
    for row in rows:
        t = (test or {}).get(row["model"])
        if t:
            row["test exact-match (95% CI)"] = f"{t['exact_match']:.2%} ({t['ci_low']:.2%}-{t['ci_high']:.2%})"
            row["test problems"] = f"{t['correct']:,}/{t['n']:,}"
    keys = list(rows[0])
    lines = [
        f"# Multiplication comparison: run {run.id}",
        "",
        f"Status: {'interrupted' if summary.interrupted else 'finished'} at step {summary.step}; "
        f"wall time of this session {format_duration(summary.wall_seconds)}.",
        "",
        "| " + " | ".join(["", *[r["model"] for r in rows]]) + " |",
        "|" + "---|" * (len(rows) + 1),
    ]
    for k in keys[1:]:
        lines.append("| " + " | ".join([k, *[r[k] for r in rows]]) + " |")
    last = {m.name: m.evals[-1] for m in summary.members if m.evals}
    if last:
        lines += ["", "Last evaluation (free-running greedy decoding on held-out val problems):", ""]
        for name, e in last.items():
            detail = ", ".join(f"{k} {format_metric(k, v)}" for k, v in e.items() if k != "step")
            lines.append(f"- {name} at step {int(e['step'])}: {detail}")
    png = run.dir / "val_exact_match.png"
    if plot(summary.members, png):
        lines += ["", f"![val exact-match by step]({png.name})"]
    path = run.dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
