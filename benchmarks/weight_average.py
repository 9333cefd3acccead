"""Averages of the weights against the last weights, in the same run: what ``--ema`` is worth
for a recipe, seed for seed, without a second run's noise.

One ``trainlab chat train`` runs in this process as the CLI would run it (the recipe as a
preset with changed settings, as in ``auto_recipe.py``, at a fixed step count and seed). Beside
it, after every optimizer step, this keeps moving averages of the weights at several decays
(each ramped as ``engine/average.py`` ramps it: ``min(decay, (1 + n) / (10 + n))``), and a
uniform average, all from ``--start`` (a fraction of the steps). At the end each is scored
on the whole val span, as the run's report scores its own weights:

    python benchmarks/weight_average.py --recipe chat-1min-dropout+ema=0 --steps 2020 --precision fp32 \\
        --seed 3 --decays 0.97,0.98,0.985,0.99 --out results/auto/weight-average.json

The recipe should train without ``--ema`` (``+ema=0``), so that its report scores the last
weights. ``--start 0.5 --no-ramp`` is how the first runs were made. Results go to ``--out``
after every run; a rerun with the same arguments skips the runs already there.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from auto_recipe import CORPORA, variant  # noqa: E402
from common import print_machine, scratch_dir  # noqa: E402

from trainlab.chat.task import ChatTask  # noqa: E402
from trainlab.engine import loop  # noqa: E402
from trainlab.engine.average import ramped_decay  # noqa: E402
from trainlab.engine.precision import cpu_summary  # noqa: E402


class Averages:
    """Moving averages at ``decays`` and a uniform one, of one member's weights, from ``start``."""

    def __init__(self, decays: list[float], start: int, ramp: bool) -> None:
        self.decays, self.start, self.ramp = decays, start, ramp
        self.kept: dict[str, list[torch.Tensor]] = {}
        self.count = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        if step + 1 < self.start:
            return
        weights = [t.detach().float() for t in model.state_dict().values()]
        self.count += 1
        if not self.kept:
            for name in [f"ema{d}" for d in self.decays] + ["uniform"]:
                self.kept[name] = [w.clone() for w in weights]
            return
        for d in self.decays:
            decay = ramped_decay(d, self.count) if self.ramp else d
            torch._foreach_lerp_(self.kept[f"ema{d}"], weights, 1 - decay)
        torch._foreach_lerp_(self.kept["uniform"], weights, 1 / self.count)


def one_run(recipe: str, steps: int, precision: str, text: str, runs_dir: str, seed: int, decays: list[float],
            start: float, ramp: bool) -> dict:
    from trainlab.cli import main

    preset, flags = variant(recipe)
    name = f"avg-{time.strftime('%H%M%S')}"
    argv = ["chat", "train", "--preset", preset, "--max-steps", str(steps), "--precision", precision, "--seed",
            str(seed), "--text", text, "--runs-dir", runs_dir, "--run-name", name, "--no-progress", "--tag",
            "benchmark", *flags]
    averages = Averages(decays, int(start * steps), ramp)
    scores: dict[str, float] = {}
    plain_step, plain_report = loop.member_step, ChatTask.report

    def step(m, task, batch, i, n, ctx):  # the loop's own step, then the averages follow it
        plain_step(m, task, batch, i, n, ctx)
        averages.update(m.model, i)

    def report(task, run, summary):
        plain_report(task, run, summary)
        member = summary.members[0]
        model = copy.deepcopy(member.model).eval()
        keys = list(member.model.state_dict())
        for kind, weights in averages.kept.items():
            model.load_state_dict(dict(zip(keys, weights)))
            scores[kind] = round(task.span_loss(model), 4)

    loop.member_step, ChatTask.report = step, report
    try:
        t = time.monotonic()
        code = main(argv)
        wall = time.monotonic() - t
    finally:
        loop.member_step, ChatTask.report = plain_step, plain_report
    if code != 0:
        raise SystemExit(f"{recipe}: exit {code}")
    report_text = (Path(runs_dir) / "chat" / name / "report.md").read_text()
    m = re.search(r"whole val span: \*\*([\d.]+)\*\*", report_text)
    return {"recipe": recipe, "steps": steps, "precision": precision, "seed": seed, "start": start, "ramp": ramp,
            "last_weights": float(m.group(1)) if m else None, "averages": scores, "wall_seconds": round(wall, 1),
            "command": "benchmarks/weight_average.py " + " ".join(sys.argv[1:]), "machine": cpu_summary(),
            "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="chat-1min-dropout+ema=0")
    ap.add_argument("--steps", type=int, default=2020)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decays", default="0.98,0.99,0.995")
    ap.add_argument("--start", type=float, default=0.0, help="fraction of the steps after which averaging starts")
    ap.add_argument("--no-ramp", action="store_true", help="each decay from the first update, not ramped")
    ap.add_argument("--corpus", default="tinyshakespeare", choices=sorted(CORPORA))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    decays = [float(d) for d in args.decays.split(",")]
    if not all(0 < d < 1 for d in decays) or not 0 <= args.start < 1:
        raise SystemExit("weight_average: decays in (0, 1) and --start in [0, 1)")
    print_machine()
    done = json.loads(args.out.read_text()) if args.out.exists() else []
    key = (args.recipe, args.steps, args.precision, args.seed, args.start, not args.no_ramp)
    if any((r["recipe"], r["steps"], r["precision"], r["seed"], r["start"], r["ramp"]) == key
           and set(decays) <= {float(k[3:]) for k in r["averages"] if k.startswith("ema")} for r in done):
        print("already measured:", key)
        return
    row = one_run(args.recipe, args.steps, args.precision, str(CORPORA[args.corpus]), scratch_dir("weight-average-"),
                  args.seed, decays, args.start, not args.no_ramp)
    print(f"{row['recipe']} seed {row['seed']}, {row['steps']} steps, {row['precision']}: last weights "
          f"{row['last_weights']:.4f}; " + ", ".join(f"{k} {v:.4f}" for k, v in row["averages"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(done + [row], indent=1) + "\n")


if __name__ == "__main__":
    main()
