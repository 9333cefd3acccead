"""The ChatGoT report: loss figures in report.md and a plot of train and val loss by step."""

from __future__ import annotations

from pathlib import Path

from trainlab.engine.member import Summary
from trainlab.engine.monitor import budget_lines, format_duration
from trainlab.engine.plots import plot_lines
from trainlab.engine.tracking import Run


def write_report(run: Run, summary: Summary, span: float | None = None, windows: int = 0, context: int = 0) -> Path:
    """``span``: the loss over the whole val span (``windows`` windows of ``context``), the
    report's last figure."""
    m = summary.members[0]
    lines = [f"# ChatGoT: run {run.id}", "",
             f"Status: {'interrupted' if summary.interrupted else 'finished'} at step {summary.step}; "
             f"{m.num_parameters:,} parameters; training time {format_duration(m.train_seconds)} "
             f"({m.examples / m.train_seconds if m.train_seconds else 0:,.1f} windows/s).", *budget_lines(summary.budget),
             ""]
    if m.evals:
        best = min(m.evals, key=lambda e: e["val_loss"])
        last = m.evals[-1]
        lines += ["| step | val loss | val perplexity | train loss |", "|---|---|---|---|"]
        lines += [f"| {int(e['step'])} | {e['val_loss']:.4f} | {e['val_perplexity']:.2f} | "
                  f"{e.get('train_loss', float('nan')):.4f} |" for e in m.evals]
        lines += ["", f"Best val loss {best['val_loss']:.4f} at step {int(best['step'])}; last {last['val_loss']:.4f}."]
    png = run.dir / "loss.png"
    curves = [("train (running mean)", [s for s, _ in m.losses], [v for _, v in m.losses]),
              ("val", [e["step"] for e in m.evals], [e["val_loss"] for e in m.evals])]
    if m.evals and plot_lines(png, curves, "cross-entropy (nats per character)", marker=""):
        lines += ["", f"![loss by step]({png.name})"]
    if span is not None:
        lines += ["", f"Loss over the whole val span: **{span:.4f}** ({windows:,} windows of {context} characters, "
                      f"step {summary.step}; the table's val loss is the fixed {'batches'} every evaluation uses)."]
    path = run.dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
