"""Does the bottleneck help with more time? Simple against latent at 1, 3, 10 and 30 minutes of
each member's training (issue 38), run stage by stage and resumable with the same command.

Every stage is an ordinary trainlab command (printed before it runs, and written to
``OUT/commands.txt``); a stage whose result is already under ``OUT`` is skipped, so the same
command continues on another machine from the results committed there (runs folders do not
survive a change of machine: a stage cut off half-way starts again).

Stages, in order:

1. ``mb-1min``, ``mb-3min``: ``multiply compare`` with both members on their 3-minute recipes
   (``results/multiply-3digit/m3-*.best.yaml``), 3 seeds, scored on the same 10,000 held-out
   3x3 problems (``--score-digits 3``).
2. ``mb10-simple``, ``mb10-latent``: a 6-trial study per member at 10 minutes, the same space,
   pruner and sampler seed, with the member's 3-minute recipe enqueued as trial 0.

    python benchmarks/latent_budgets.py --runs-dir /tmp/mb-runs --out results/multiply-budgets
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

RECIPES = {"simple": "results/multiply-3digit/m3-simple.best.yaml",
           "latent": "results/multiply-3digit/m3-latent.best.yaml"}
COMPARE_FILES = ("compare.json", "results.json", "report.md", "accuracy_vs_steps.png", "accuracy_vs_time.png")


def trainlab(args: list[str], log: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "trainlab", *args]
    line = "trainlab " + shlex.join(args)
    print(f"\n[{time.strftime('%H:%M:%S')}] {line}", flush=True)
    with open(out / "commands.txt", "a", encoding="utf-8") as f:
        f.write(line + "\n")
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for text in proc.stdout:
            f.write(text)
            f.flush()
            print(text, end="", flush=True)
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"stage failed (exit {rc}): {line}")


def compare(minutes: float, runs_dir: Path, out: Path) -> None:
    cid = f"mb-{minutes:g}min"
    dest = out / cid
    if (dest / "results.json").exists():
        print(f"{cid}: done ({dest / 'results.json'})")
        return
    trainlab(["multiply", "compare", "--preset", "multiply-3digit", "--precision", "fp32", "--seeds", "3",
              "--budget-minutes", f"{minutes:g}", "--recipe-simple", RECIPES["simple"],
              "--recipe-latent", RECIPES["latent"], "--score-digits", "3", "--id", cid,
              "--runs-dir", str(runs_dir), "--no-progress"], out / f"{cid}.log", out)
    dest.mkdir(parents=True, exist_ok=True)
    for name in COMPARE_FILES:
        src = runs_dir / "compare" / cid / name
        if src.exists():
            shutil.copy2(src, dest / name)


def study(member: str, minutes: float, trials: int, runs_dir: Path, out: Path) -> None:
    name = f"mb{minutes:g}-{member}"
    db = out / f"{name}.db"
    shown = out / f"{name}.show.txt"
    if shown.exists():
        print(f"{name}: done ({shown})")
        return
    storage = f"sqlite:///{db}"
    trainlab(["tune", "multiply", "--preset", "multiply-3digit", "--space", "3digit", "--members", member,
              "--study", name, "--budget-minutes", f"{minutes:g}", "--trials", str(trials), "--pruner", "median",
              "--seed", "0", "--precision", "fp32", "--enqueue", RECIPES[member], "--storage", storage,
              "--runs-dir", str(runs_dir), "--no-progress"], out / f"{name}.log", out)
    show = subprocess.run([sys.executable, "-m", "trainlab", "tune", "show", name, "--storage", storage,
                           "--runs-dir", str(runs_dir)], capture_output=True, text=True, check=True)
    folder = runs_dir / "tune" / name
    shutil.copy2(folder / "best.yaml", out / f"{name}.best.yaml")
    for png in folder.glob("*.png"):
        shutil.copy2(png, out / f"{name}.{png.name}")
    shown.write_text(show.stdout, encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", type=Path, default=Path("runs-bench/budgets"))
    p.add_argument("--out", type=Path, default=Path("results/multiply-budgets"))
    p.add_argument("--stages", default="compare-1,compare-3,study-10",
                   help="comma-separated: compare-M (M minutes), study-M (both members' studies at M minutes)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for stage in args.stages.split(","):
        kind, _, m = stage.partition("-")
        if kind == "compare":
            compare(float(m), args.runs_dir, args.out)
        elif kind == "study":
            for member in ("simple", "latent"):
                study(member, float(m), 6, args.runs_dir, args.out)
        else:
            raise SystemExit(f"unknown stage {stage!r}")


if __name__ == "__main__":
    main()
