"""Markdown reports of multiplication runs, each in report.md beside its plots: one run's
members side by side (``write_report``, at the end of training), and a comparison over
seeds (``write_comparison_report``, for ``multiply compare``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from trainlab.engine.member import Member, Summary
from trainlab.engine.monitor import budget_lines, format_duration
from trainlab.engine.plots import plot_lines
from trainlab.engine.tracking import Run
from trainlab.multiply.config import MODEL_KINDS as MEMBERS  # a comparison's members, in its tables' order
from trainlab.stats import format_p, p_relation

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
        *budget_lines(summary.budget),
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


# -- a comparison over seeds -------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _training_line(results: dict[str, Any]) -> str:
    """How long each member trained: one step count for lockstep runs, each member's own under
    --budget-minutes (older results.json files have no per-member steps)."""
    r0, pr = results["per_seed"][0], results["protocol"]
    steps = {m: r0["members"][m].get("steps", r0["steps"]) for m in MEMBERS}
    own = pr.get("members") or {}
    if pr.get("budget_minutes") is None and len(set(steps.values())) == 1 and not own:
        return (f"each an ordinary run of {r0['steps']:,} steps (batch {pr['batch_size']}, precision "
                f"{pr['precision']}).")
    per = "; ".join(f"{m} {steps[m]:,} steps of batch {own.get(m, {}).get('batch_size', pr['batch_size'])} in "
                    f"{own.get(m, {}).get('precision', pr['precision'])} "
                    f"({r0['members'][m]['train_seconds'] / 60:.1f} minutes of training)" for m in MEMBERS)
    budget = (f"{pr['budget_minutes']:g} minutes of each member's own training, its step count fitted once from "
              f"a short timing: " if pr.get("budget_minutes") is not None else "")
    return f"{budget}{per} (seed {r0['seed']}'s figures)."


def write_comparison_report(folder: Path, results: dict[str, Any]) -> Path:
    """``report.md`` and its plots in ``folder``, from the comparison's ``results.json`` data
    alone (``multiply/compare.py``'s ``summarize``), so a committed results.json remakes them."""
    r0 = results["per_seed"][0]
    params = {m: r0["members"][m]["parameters"] for m in MEMBERS}
    pr = results["protocol"]
    lines = [f"# simple vs latent: comparison {results['id']}", "",
             f"**Verdict: {results['verdict']}.**", "",
             "## Protocol", "",
             f"- Problems: {pr['min_digits']}-{pr['max_digits']} digit operands; scored on {results['n']:,} held-out "
             + (f"{pr['score_digits']}x{pr['score_digits']}-digit " if pr.get("score_digits") else "")
             + f"test problems{' (all of them)' if results['n'] < pr['test_n'] else ''}, the same ones for every "
             f"seed and member, answered free-running (greedy, no teacher forcing).",
             f"- Seeds: {', '.join(map(str, results['seeds']))}; " + _training_line(results),
             f"- Recipes: {'one recipe for both members, trained in lockstep on the same batches' if pr['same_recipe'] else 'each member its own recipe: ' + ', '.join(f'{m} from {f}' for m, f in pr['recipes'].items())}.",
             f"- Parameters: simple {params['simple']:,}, latent {params['latent']:,}"
             + (" (matched with --match-params)" if pr["match_params"] else "") + ".",
             f"- Statistics (`trainlab/stats.py`): Wilson 95% intervals; per seed, the paired difference latent - "
             f"simple with McNemar's exact test and the Agresti-Min interval; over seeds, the "
             f"{results['effect']['basis']}, and the effect's {results['effect'].get('interval', 'interval')}; "
             f"a verdict needs p < 0.05 and that interval on one side of 0.", "",
             "## Result", "",
             "| | simple | latent |", "|---|---|---|"]
    cells = [f"{_pct(results['pooled'][m]['exact_match'])} ({_pct(results['pooled'][m]['ci'][0])}-"
             f"{_pct(results['pooled'][m]['ci'][1])})" for m in MEMBERS]
    lines.append(f"| test exact-match, all seeds (95% CI) | {cells[0]} | {cells[1]} |")
    for c in sorted(results["pooled"]["simple"]["classes"]):
        lines.append(f"| class {c} (mean over seeds) | {_pct(results['pooled']['simple']['classes'][c])} | "
                     f"{_pct(results['pooled']['latent']['classes'][c])} |")
    e = results["effect"]
    lines += ["", f"Effect (latent - simple, points of exact-match): {100 * e['mean_diff']:+.2f}, 95% interval "
                  f"{100 * e['ci'][0]:+.2f} to {100 * e['ci'][1]:+.2f}" + (f", sd over seeds {100 * e['sd']:.2f}"
                                                                           if not math.isnan(e['sd']) else "")
              + f"; p {p_relation(e['p'])} ({e['basis']}).", "",
              "## Per seed", "",
              "| seed | simple (95% CI) | latent (95% CI) | latent - simple (95% CI) | only simple right | only latent right | McNemar p | train time simple / latent |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["per_seed"]:
        s, la, p = r["members"]["simple"], r["members"]["latent"], r["paired"]
        lines.append(f"| {r['seed']} | {_pct(s['exact_match'])} ({_pct(s['ci'][0])}-{_pct(s['ci'][1])}) | "
                     f"{_pct(la['exact_match'])} ({_pct(la['ci'][0])}-{_pct(la['ci'][1])}) | "
                     f"{100 * p['diff']:+.2f} ({100 * p['ci'][0]:+.2f} to {100 * p['ci'][1]:+.2f}) | {p['b']} | "
                     f"{p['c']} | {format_p(p['p'])} | {s['train_seconds']:.0f} s / {la['train_seconds']:.0f} s |")
    pngs = plot_curves(folder, results)
    lines += [""] + [f"![{name}]({name})" for name in pngs]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def plot_curves(folder: Path, results: dict[str, Any]) -> list[str]:
    """Val exact-match against steps and against each member's own training time: the mean
    over seeds, with a band from the lowest to the highest seed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for name, by_time in (("accuracy_vs_steps.png", False), ("accuracy_vs_time.png", True)):
        fig, ax = plt.subplots(figsize=(7, 4))
        for m in MEMBERS:
            seeds = [r for r in results["per_seed"] if r["curves"].get(m)]
            curves = [r["curves"][m] for r in seeds]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            steps = np.array([step for step, _ in curves[0][:n]], float)
            ys = np.array([[v for _, v in c[:n]] for c in curves]) * 100  # (seeds, points)
            if by_time:
                per_step = np.mean([r["members"][m]["train_seconds"] / max(1, r["members"][m].get("steps", r["steps"]))
                                    for r in seeds])
                xs = steps * per_step / 60
            else:
                xs = steps
            ax.plot(xs, ys.mean(0), label=f"{m} (mean of {len(curves)} seed{'s' if len(curves) > 1 else ''})")
            ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.2)
        ax.set_xlabel("minutes of the member's own training" if by_time else "step")
        ax.set_ylabel("val exact-match (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written
