"""Does ``--preset auto`` pick the best shipped recipe for the minutes? Each budget, on each
corpus, runs ``chat train --preset auto --minutes M`` beside every shipped recipe it chooses
among (``trainlab.auto.CANDIDATES``) at the same ``--minutes M``, each a fresh process timed
from outside (``minutes_accuracy.one_run``), and prints the loss over the whole val span of
each, auto's choice, and auto's distance from the best (target: within 0.01).

    python benchmarks/make_kjv.py --out build/corpora/kjv.txt
    python benchmarks/auto_recipe.py --minutes 1,5 --corpora tinyshakespeare,kjv --out results/auto/avx512-bf16.json
    python benchmarks/auto_recipe.py --minutes 20 --recipes auto --precision fp32 --out results/auto/avx512-bf16.json

A recipe may carry changed settings (``chat-20min+dropout=0.2``): how a new candidate is
tried at equal minutes before it is shipped. A recipe is left out at a budget it cannot
start in (chat-quick's 12 s and chatgot-14m's hour are not compared at 20 minutes and 1
minute: ``--recipes`` names them). Results go to
``--out`` after every run; a rerun with the same ``--out`` skips the runs already there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import print_machine, scratch_dir  # noqa: E402
from minutes_accuracy import one_run  # noqa: E402

CORPORA = {"tinyshakespeare": ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
           "kjv": ROOT / "build" / "corpora" / "kjv.txt"}
# the recipes worth comparing at a budget (the others cannot start, or are far from their size)
DEFAULT_RECIPES = {1.0: "auto,chat-quick,chat-1min,chat-20min",
                   5.0: "auto,chat-1min,chat-1min-dropout,chat-5min,chat-20min",
                   20.0: "auto,chat-1min-dropout,chat-5min-dropout,chat-20min,chat-20min-ctx256"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", default="1,5", help="budgets, comma-separated")
    ap.add_argument("--corpora", default="tinyshakespeare,kjv", help=f"of {', '.join(CORPORA)}, or paths")
    ap.add_argument("--recipes", help="presets (and auto) to run at every budget (default: by budget)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", required=True, help="JSON file of the results (resumable)")
    args = ap.parse_args()
    print_machine()
    runs_dir = scratch_dir("auto-recipe-")
    done: list[dict] = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else []
    for corpus in args.corpora.split(","):
        text = CORPORA.get(corpus, Path(corpus))
        if not Path(text).is_file():
            raise SystemExit(f"auto_recipe: no corpus at {text} (kjv: python benchmarks/make_kjv.py)")
        for minutes in (float(m) for m in args.minutes.split(",")):
            recipes = (args.recipes or DEFAULT_RECIPES.get(minutes, "auto,chat-1min,chat-20min")).split(",")
            for recipe in recipes:
                key = {"corpus": corpus, "minutes": minutes, "recipe": recipe, "precision_asked": args.precision}
                if any(all(r.get(k) == v for k, v in key.items()) for r in done):
                    continue
                extra = [] if args.precision == "auto" else ["--precision", args.precision]
                preset, flags = variant(recipe)
                try:
                    r = {**key, **one_run("chat", minutes, runs_dir, str(text), extra + flags, preset)}
                except SystemExit as e:  # refused (a budget too small for its warm-up): recorded, and on
                    r = {**key, "refused": str(e).strip().splitlines()[-1][-300:]}
                done.append(r)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(done, indent=1) + "\n")
                if "refused" in r:
                    print(f"{corpus:>15} {minutes:>4g} min {recipe:>11}: {r['refused']}", flush=True)
                    continue
                loss = (r["figure"] or {}).get("val_span_loss")
                print(f"{corpus:>15} {minutes:>4g} min {recipe:>11}{' -> ' + r['auto'] if r['auto'] else '':<15} "
                      f"{r['precision']:>5}: wall {r['wall_seconds']:6.1f} s ({100 * r['error']:+.1f}%), "
                      f"{r['steps']:,} steps, val span {loss}", flush=True)
    summarize(done)


def variant(recipe: str) -> tuple[str, list[str]]:
    """A recipe is a preset, or a preset with changed settings, for trying a new recipe beside
    the shipped ones: ``chat-20min+dropout=0.2+pair-embedding`` runs ``--preset chat-20min
    --dropout 0.2 --pair-embedding``."""
    preset, *changes = recipe.split("+")
    flags: list[str] = []
    for change in changes:
        name, _, value = change.partition("=")
        flags += [f"--{name}"] + ([value] if value else [])
    return preset, flags


def summarize(done: list[dict]) -> None:
    """Per corpus, budget and precision: auto's loss against the best shipped recipe's, as
    lines and as one markdown table (what results/auto/README.md shows)."""
    groups: dict[tuple, list[dict]] = {}
    for r in done:
        groups.setdefault((r["corpus"], r["minutes"], r["precision_asked"]), []).append(r)
    names = ["chat-quick", "chat-1min", "chat-1min-dropout", "chat-5min", "chat-5min-dropout", "chat-20min",
             "chat-20min-ctx256"]
    print("| corpus | minutes | --precision | auto chose (ran in) | auto | " + " | ".join(names) + " | auto - best |")
    print("|---|---|---|---|---|" + "---|" * len(names) + "---|")
    for (corpus, minutes, precision), rows in sorted(groups.items()):
        cell = {r["recipe"]: r for r in rows}

        def show(recipe: str) -> str:
            r = cell.get(recipe)
            if r is not None and "refused" in r:
                return "refused (warm-up does not fit)"
            loss = (r or {}).get("figure") and r["figure"].get("val_span_loss")
            return f"{loss:.4f} ({r['wall_seconds']:.0f} s)" if loss else "-"

        shipped = [(cell[n]["figure"]["val_span_loss"], n) for n in names if cell.get(n, {}).get("figure")]
        auto = cell.get("auto")
        gap = (f"{auto['figure']['val_span_loss'] - min(shipped)[0]:+.4f}" if auto and auto.get("figure") and shipped
               else "-")
        chose = f"{auto['auto']} ({auto['precision']})" if auto else "-"
        print(f"| {corpus} | {minutes:g} | {precision} | {chose} | {show('auto')} | "
              + " | ".join(show(n) for n in names) + f" | {gap} |")
    for (corpus, minutes, precision), rows in sorted(groups.items()):
        loss = {r["recipe"]: (r.get("figure") or {}).get("val_span_loss") for r in rows}
        shipped = {k: v for k, v in loss.items() if k != "auto" and v is not None}
        if "auto" not in loss or not shipped:
            continue
        best = min(shipped, key=shipped.get)
        picked = next(r.get("auto") for r in rows if r["recipe"] == "auto")
        gap = loss["auto"] - shipped[best]
        print(f"{corpus} {minutes:g} min ({precision}): auto -> {picked} {loss['auto']:.4f}; best shipped {best} "
              f"{shipped[best]:.4f}; gap {gap:+.4f} ({'within' if gap <= 0.01 else 'outside'} 0.01)")


if __name__ == "__main__":
    main()
