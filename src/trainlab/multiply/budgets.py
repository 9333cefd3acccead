"""``trainlab multiply budgets``: does the bottleneck help with more time? One figure and one
table over finished comparisons at several budgets (``multiply compare --budget-minutes M``),
made from their ``results.json`` files alone, so anyone can remake them from committed results.

Comparisons only line up when they differ in nothing but their minutes: the same digit range,
test split, scored problems (``--test-n``, ``--score-digits``), precision, parameter matching,
and the machine class their step counts were fitted on (minutes buy different steps on each).
Anything else is refused in one line naming the difference.

The figure plots test exact-match against minutes of each member's training (log scale): per
member the mean over seeds, its band (lowest to highest seed) and each seed. The table gives
per budget the pooled exact-match with its Wilson interval, the paired difference (latent
minus simple, in points) with its interval, the p-value and the verdict of the comparison.
Where the curves go: the budget at which latent reaches what simple reached at
``--reach-minutes`` (interpolated between measured budgets on log minutes), if it does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trainlab.config import UsageError, read_small_file
from trainlab.stats import format_p

MEMBERS = ("simple", "latent")
# what must agree for comparisons at different budgets to share one figure
SAME = ("min_digits", "max_digits", "test_n", "score_digits", "val_fraction", "test_fraction", "test_subset_seed",
        "machine_class", "precision", "match_params")


def load_comparison(path: str | Path) -> dict[str, Any]:
    """A finished comparison's results: a ``results.json`` file or the folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.exists():
        raise UsageError(f"{path}: no results.json (a finished `multiply compare` writes one)")
    try:
        data = json.loads(read_small_file(p, "results file", limit=64 << 20))
    except ValueError:
        raise UsageError(f"{p} is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("protocol"), dict) or "per_seed" not in data:
        raise UsageError(f"{p} is not a comparison's results.json")
    if data["protocol"].get("budget_minutes") is None:
        raise UsageError(f"{p}: comparison {data.get('id')!r} trained fixed steps, not --budget-minutes")
    data["_path"] = str(p)
    return data


def check_same_protocol(comparisons: list[dict[str, Any]]) -> None:
    """Refuse, in one line naming the difference, comparisons that differ in more than minutes."""
    first = comparisons[0]
    for other in comparisons[1:]:
        for key in SAME:
            a, b = first["protocol"].get(key), other["protocol"].get(key)
            if a != b:
                raise UsageError(f"comparisons differ in {key}: {first.get('id')!r} has {a!r}, {other.get('id')!r} "
                                 f"has {b!r}; a budgets figure needs them alike but for their minutes")
        if first.get("n") != other.get("n"):
            raise UsageError(f"comparisons scored different problems: {first.get('id')!r} {first.get('n')}, "
                             f"{other.get('id')!r} {other.get('n')}")
    minutes = [c["protocol"]["budget_minutes"] for c in comparisons]
    twice = sorted({m for m in minutes if minutes.count(m) > 1})
    if twice:
        raise UsageError(f"two comparisons at {twice[0]:g} minutes; give one per budget")


def crossing(minutes: list[float], values: list[float], target: float) -> float | None:
    """The first budget at which ``values`` (by increasing ``minutes``) reach ``target``,
    interpolated linearly on log minutes between the measured budgets; None if they never do."""
    for i, v in enumerate(values):
        if v >= target:
            if i == 0:
                return minutes[0]
            lo, hi = values[i - 1], v
            t = (target - lo) / (hi - lo)
            return math.exp(math.log(minutes[i - 1]) + t * (math.log(minutes[i]) - math.log(minutes[i - 1])))
    return None


def summarize_budgets(comparisons: list[dict[str, Any]], reach_minutes: float = 3.0) -> dict[str, Any]:
    """Every figure of the table and the plot, as data (also written to budgets.json)."""
    if len(comparisons) < 2:
        raise UsageError("a budgets figure needs comparisons at two budgets at least")
    check_same_protocol(comparisons)
    rows = []
    for c in sorted(comparisons, key=lambda c: c["protocol"]["budget_minutes"]):
        row: dict[str, Any] = {"id": c.get("id"), "minutes": float(c["protocol"]["budget_minutes"]),
                               "seeds": [r["seed"] for r in c["per_seed"]], "source": c["_path"],
                               "recipes": c["protocol"].get("recipes", {}), "members": {}}
        for m in MEMBERS:
            per_seed = [float(r["members"][m]["exact_match"]) for r in c["per_seed"]]
            row["members"][m] = {"exact_match": float(c["pooled"][m]["exact_match"]),
                                 "ci": [float(x) for x in c["pooled"][m]["ci"]], "per_seed": per_seed,
                                 "steps": sorted({int(r["members"][m]["steps"]) for r in c["per_seed"]})}
        effect = c["effect"]
        row["effect"] = {"mean_diff": float(effect["mean_diff"]), "ci": [float(x) for x in effect["ci"]],
                         "p": float(effect["p"])}
        row["verdict"] = c.get("verdict", "")
        rows.append(row)
    minutes = [r["minutes"] for r in rows]
    reach: dict[str, Any] = {"reference_minutes": reach_minutes}
    if reach_minutes in minutes:
        target = rows[minutes.index(reach_minutes)]["members"]["simple"]["exact_match"]
        at = crossing(minutes, [r["members"]["latent"]["exact_match"] for r in rows], target)
        reach.update(target=target, latent_minutes=at)
    protocol = {k: comparisons[0]["protocol"].get(k) for k in SAME}
    return {"protocol": protocol, "rows": rows, "reach": reach}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def reach_sentence(summary: dict[str, Any]) -> str:
    reach, rows = summary["reach"], summary["rows"]
    ref = reach["reference_minutes"]
    if "target" not in reach:
        return f"No comparison at {ref:g} minutes, so no reference to reach (--reach-minutes)."
    target, at = reach["target"], reach.get("latent_minutes")
    said = f"What simple reached at {ref:g} minutes ({_pct(target)})"
    if at is None:
        best = max(rows, key=lambda r: r["members"]["latent"]["exact_match"])
        return (f"{said}: latent does not reach it within {rows[-1]['minutes']:g} minutes (its best: "
                f"{_pct(best['members']['latent']['exact_match'])} at {best['minutes']:g} minutes).")
    if at == rows[0]["minutes"]:
        return f"{said}: latent reaches it by {at:g} minutes, the smallest budget measured."
    return f"{said}: latent reaches it at about {at:.1f} minutes (interpolated on log minutes)."


def table(summary: dict[str, Any]) -> str:
    lines = ["| minutes | steps simple / latent | simple (95% CI) | latent (95% CI) | latent - simple, points (95% CI) "
             "| per seed | p | verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        s, la, e = r["members"]["simple"], r["members"]["latent"], r["effect"]
        steps = " / ".join(",".join(f"{n:,}" for n in r["members"][m]["steps"]) for m in MEMBERS)
        per_seed = ", ".join(f"{100 * (b - a):+.2f}" for a, b in zip(s["per_seed"], la["per_seed"]))
        lines.append(f"| {r['minutes']:g} | {steps} | {_pct(s['exact_match'])} ({_pct(s['ci'][0])}-{_pct(s['ci'][1])})"
                     f" | {_pct(la['exact_match'])} ({_pct(la['ci'][0])}-{_pct(la['ci'][1])}) | "
                     f"{100 * e['mean_diff']:+.2f} ({100 * e['ci'][0]:+.2f} to {100 * e['ci'][1]:+.2f}) | {per_seed} | "
                     f"{format_p(e['p'])} | {r['verdict']} |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    x = [r["minutes"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, color in zip(MEMBERS, ("tab:blue", "tab:orange")):
        seeds = [[100 * v for v in r["members"][m]["per_seed"]] for r in rows]
        mean = [sum(s) / len(s) for s in seeds]
        ax.fill_between(x, [min(s) for s in seeds], [max(s) for s in seeds], color=color, alpha=0.2, linewidth=0)
        ax.plot(x, mean, "o-", color=color, label=f"{m} (mean over seeds; band: lowest to highest)")
        for xi, s in zip(x, seeds):
            ax.plot([xi] * len(s), s, ".", color=color, alpha=0.5, markersize=4)
    ax.set_xscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{v:g}" for v in x])
    ax.minorticks_off()
    digits = summary["protocol"].get("score_digits")
    what = f"{digits}x{digits} test exact-match (%)" if digits else "test exact-match (%)"
    ax.set_xlabel(f"minutes of each member's training ({summary['protocol'].get('machine_class')})")
    ax.set_ylabel(what)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("simple vs latent at each budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_budgets(folder: Path, summary: dict[str, Any]) -> list[Path]:
    """budgets.json, budgets.md (the table and where the curves go) and budgets.png in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    proto = summary["protocol"]
    digits = proto.get("score_digits")
    scored = f"the same {proto.get('test_n'):,} held-out " + (f"{digits}x{digits} problems" if digits else "problems")
    text = "\n".join([
        "# Simple vs latent at each budget",
        "",
        f"Each row is one `multiply compare --budget-minutes M` ({len(summary['rows'][0]['seeds'])} seeds), "
        f"scored on {scored}; steps fitted on {proto.get('machine_class')}, precision {proto.get('precision')}.",
        "",
        table(summary),
        "",
        reach_sentence(summary),
        "",
        "Sources: " + ", ".join(f"`{r['source']}`" for r in summary["rows"]),
        "",
        "![simple vs latent by minutes](budgets.png)",
        "",
    ])
    (folder / "budgets.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (folder / "budgets.md").write_text(text, encoding="utf-8")
    return [folder / "budgets.md", folder / "budgets.json", plot(summary, folder / "budgets.png")]
