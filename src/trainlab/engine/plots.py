"""Line plots for run reports (matplotlib, headless); a missing matplotlib skips the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_lines(path: Path, curves: Sequence[tuple[str, Sequence[float], Sequence[float]]], ylabel: str,
               ylim: tuple[float, float] | None = None, marker: str = "o") -> bool:
    """One figure with a line per (label, steps, values); False if matplotlib is missing."""
    try:
        # a Figure drawn straight to a file needs no pyplot (no backend to choose, no global
        # figure list to close); what a report's plot costs is matplotlib itself (0.3-0.4 s to
        # import here), pyplot adds 13 ms
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for label, xs, ys in curves:
        ax.plot(xs, ys, marker=marker, ms=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
