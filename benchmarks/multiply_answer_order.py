"""Evidence for the default answer order: reversed vs natural on 2-digit problems.

Trains the plain model twice with identical settings and seed, once per answer order,
and prints val exact-match along the way. Run one at a time (2 cores).

    python benchmarks/multiply_answer_order.py [--steps 800]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import print_machine  # noqa: E402

from trainlab.engine.loop import train  # noqa: E402
from trainlab.engine.tracking import new_run  # noqa: E402
from trainlab.engine.train_config import TrainConfig
from trainlab.multiply.config import (  # noqa: E402
    LossConfig,  # noqa: E402
    MultiplyDataConfig,  # noqa: E402
    MultiplyTaskConfig,
    Seq2SeqConfig,  # noqa: E402
    TeacherForcingConfig,
)
from trainlab.multiply.task import MultiplyTask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print_machine()
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for order in ("reversed", "natural"):
            cfg = TrainConfig(max_steps=args.steps, batch_size=128, lr=3e-3, warmup_steps=50,
                              eval_every=max(1, args.steps // 8), save_every=10**9, runs_dir=tmp, tag="benchmark",
                              progress=False, seed=args.seed, device="cpu", precision="fp32")
            data = MultiplyDataConfig(min_digits=2, max_digits=2, answer_order=order)
            model = Seq2SeqConfig(d_model=64, nhead=4, num_layers=2)
            task = MultiplyTask(data, model, LossConfig(), TeacherForcingConfig(),
                                MultiplyTaskConfig(members="simple", eval_samples=1000), cfg)
            config = {"data": asdict(data), "model": asdict(model), "train": asdict(cfg)}
            summary = train(task, cfg, new_run(tmp, task.name, order, "benchmark", config), config, echo=lambda *a: None)
            curves[order] = [(int(e["step"]), e["train_exact_match"], e["digit_accuracy"])
                             for e in summary.members[0].evals]
    print("\n2-digit x 2-digit, plain model (d_model 64, 2+2 layers), fp32, same seed and batches;")
    print("exact-match on a fixed slice of 500 training problems and digit accuracy on held-out val, free-running")
    print(f"{'step':>6} {'reversed EM':>12} {'natural EM':>11} {'reversed digit':>15} {'natural digit':>14}")
    for (s, r, rd), (_, n, nd) in zip(curves["reversed"], curves["natural"]):
        print(f"{s:>6} {r:>12.1%} {n:>11.1%} {rd:>15.1%} {nd:>14.1%}")


if __name__ == "__main__":
    main()
