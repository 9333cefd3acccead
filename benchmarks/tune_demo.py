"""A study on 1-2 digit multiplication, then its best recipe trained for 2 minutes and scored
on every held-out test problem of the range.

    python benchmarks/tune_demo.py                       # 20 one-minute trials, median pruning
    python benchmarks/tune_demo.py --trials 8 --trial-minutes 0.5

The study runs `trainlab tune multiply --space demo` (shipped with the package) on 1-2 digit
problems, scored on val exact-match of the 2x2 class, with pruning. Then `trainlab tune
show` writes its best.yaml, which trains once more with twice the trial's steps (about 2
minutes) and is evaluated by `trainlab multiply evaluate` on the whole test split. The
script prints the study's wall time, its best trial, what pruning saved (trials pruned,
and minutes spent against as many full-length trials), and the final test figures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import print_machine, scratch_dir

BASE = ["--min-digits", "1", "--max-digits", "2", "--nhead", "4", "--num-latent", "4", "--eval-every", "100",
        "--eval-samples", "1000", "--save-every", "100000", "--no-progress", "--device", "cpu", "--precision", "fp32"]


def trainlab(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "trainlab", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"trainlab {' '.join(args[:3])} failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    return p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--trial-minutes", type=float, default=1.0)
    ap.add_argument("--final-minutes", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs-dir", help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    print_machine()
    runs = Path(args.runs_dir or scratch_dir("tune-demo-"))
    t0 = time.perf_counter()
    out = trainlab("tune", "multiply", "--space", "demo", "--trials", str(args.trials), "--budget-minutes",
                   str(args.trial_minutes), "--study", "demo", "--runs-dir", str(runs), "--seed", str(args.seed),
                   "--objective", "exact_match_2x2", "--tag", "benchmark", *BASE)
    wall = time.perf_counter() - t0
    print(out)
    shown = trainlab("tune", "show", "demo", "--runs-dir", str(runs))
    print(shown)
    import optuna

    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{runs / 'tune' / 'demo' / 'study.db'}")
    trials = study.get_trials(deepcopy=False)
    took = {t.number: (t.datetime_complete - t.datetime_start).total_seconds() for t in trials
            if t.state.name in ("COMPLETE", "PRUNED") and t.datetime_complete}  # failed ones: their end is unknown
    pruned = [n for n, t in zip(took, trials) if study.trials[n].state.name == "PRUNED"]
    full = sorted(took[t.number] for t in trials if t.state.name == "COMPLETE")
    typical = full[len(full) // 2] if full else 0.0
    spent = sum(took.values())
    print(f"study: {len(trials)} trials, {wall / 60:.1f} min of wall time for this command; {len(pruned)} pruned; the "
          f"{len(took)} finished trials took {spent / 60:.1f} min, against {len(took) * typical / 60:.1f} min had none "
          f"been pruned (a full trial's median {typical:.0f} s)")
    best = study.best_trial
    steps = int(best.user_attrs["max_steps"] * args.final_minutes / args.trial_minutes)
    config = runs / "tune" / "demo" / "best.yaml"
    print(f"best trial {best.number}: {yaml.safe_dump(best.params, default_flow_style=True).strip()}; "
          f"training it again for {steps} steps (~{args.final_minutes:g} min)")
    out = trainlab("multiply", "train", "--config", str(config), "--runs-dir", str(runs), "--run-name", "final",
                   "--max-steps", str(steps), "--tag", "benchmark", "--no-progress", "--eval-every", str(steps))
    ev = trainlab("multiply", "evaluate", "final", "--runs-dir", str(runs), "--split", "test", "--n", "1000000")
    print(ev)
    report = (runs / "parallel_comparison" / "final" / "report.md").read_text()
    for line in report.splitlines():
        if line.startswith(("| train time", "| parameters", "|  |")):
            print(line)


if __name__ == "__main__":
    main()
