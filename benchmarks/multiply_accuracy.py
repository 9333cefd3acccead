"""Accuracy over time on 3-digit x 3-digit multiplication, both models side by side.

Target (issue 2): the better model reaches 99% free-running exact-match on >= 10,000
held-out test problems within 30 minutes of training on a 2-core CPU.

    python benchmarks/multiply_accuracy.py --minutes 30 [any `trainlab multiply train` flag]

The preset (``multiply-3digit``) trains on every 1-3 digit problem, because the easier
ones teach the harder; the curve and the final test score 3x3-digit problems only.
The time budget counts training steps only (evaluation excluded) and is shared by the
members trained in lockstep. The script times a few steps first and sets --max-steps
(and so the end of the cosine LR decay) to fit the budget, then prints the val
exact-match curve of both models and a final test evaluation with 95% intervals.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_machine, seconds_per_step  # noqa: E402

from trainlab import runs  # noqa: E402
from trainlab.cli import build_parser  # noqa: E402
from trainlab.cli.common import flags_of  # noqa: E402
from trainlab.config import build  # noqa: E402
from trainlab.engine.loop import train  # noqa: E402
from trainlab.engine.tracking import new_run  # noqa: E402
from trainlab.multiply.evaluation import evaluate_members
from trainlab.multiply.inference import evaluation_dataset  # noqa: E402
from trainlab.multiply.task import MultiplyTask  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead of timing a "
                    "few and fitting --minutes: fairer between settings of equal step cost, as the timing "
                    "of a shared machine moves by several percent")
    ap.add_argument("--test-n", type=int, default=10000)
    ap.add_argument("--evals", type=int, default=15, help="evaluations over the run")
    known, rest = ap.parse_known_args()
    print_machine()
    args = build_parser().parse_args(["multiply", "train", "--preset", "multiply-3digit", *rest])
    sections = runs.multiply_sections()
    values = runs.settings("multiply", args.preset, args.config, flags_of(args))
    cfgs = {name: build(cls, values) for name, cls in sections}
    make = lambda c: MultiplyTask(c["data"], c["model"], c["loss"], c["teacher_forcing"], c["task"], c["train"])  # noqa
    if known.steps:
        steps, budget = known.steps, "as asked"
    else:
        sps = seconds_per_step(make(cfgs), cfgs["train"])
        steps, budget = max(10, int(known.minutes * 60 / sps)), f"in {known.minutes} min ({sps:.3f} s/step)"
    cfgs["train"] = replace(cfgs["train"], max_steps=steps, lr_decay_steps=steps,
                            eval_every=max(1, steps // known.evals), progress=False)
    task = make(cfgs)
    config = {name: asdict(c) for name, c in cfgs.items()}
    run = new_run(cfgs["train"].runs_dir, task.name, cfgs["train"].run_name, cfgs["train"].tag or "benchmark", config)
    print(f"{len(task.model_cfgs)} model(s): {steps} steps {budget}; run {run.dir}")
    summary = train(task, cfgs["train"], run, config)

    top = cfgs["data"].max_digits  # the hardest class: max-digit x max-digit problems
    key = f"exact_match_{top}x{top}"  # what is scored, also when easier problems are trained on
    print(f"\nval exact-match on {top}x{top}-digit problems by training time "
          f"(minutes of training steps, both models together)")
    names = [m.name for m in summary.members]
    print(f"{'step':>7} {'minutes':>8} " + " ".join(f"{n:>10}" for n in names))
    per_step = sum(m.train_seconds for m in summary.members) / max(1, summary.step) / 60
    for i, e in enumerate(summary.members[0].evals):
        row = " ".join(f"{m.evals[i].get(key, m.evals[i]['exact_match']):>10.2%}" for m in summary.members)
        print(f"{int(e['step']):>7} {e['step'] * per_step:>8.1f} {row}")
    models = {m.name: m.model.eval() for m in summary.members}
    ds = evaluation_dataset(cfgs["data"], top, top)
    print(f"\nfinal test evaluation ({known.test_n} held-out problems, free-running greedy):")
    for name, r in evaluate_members(models, ds, "test", known.test_n, seed=0).items():
        m = next(x for x in summary.members if x.name == name)
        print(f"  {name:>7}: exact-match {r['exact_match']:.2%} (95% CI {r['ci_low']:.2%}-{r['ci_high']:.2%}), "
              f"digit accuracy {r['digit_accuracy']:.2%}, {m.num_parameters:,} params, "
              f"{m.train_seconds / 60:.1f} min of its own training")


if __name__ == "__main__":
    main()
