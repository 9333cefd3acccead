"""Multiplication training speed: examples/s of both models, side by side in one run.

    python benchmarks/multiply_throughput.py                       # multiply-3digit preset
    python benchmarks/multiply_throughput.py --preset demo --steps 100 --micro off,auto,64

Each ``--micro-batch`` setting trains the preset's two models in lockstep for ``--steps``
steps (one run after another, never two at once) and prints each model's median
examples/s over the log intervals after the first two, read back from TensorBoard's
``perf/examples_per_sec``. The accuracy-over-time benchmark is multiply_accuracy.py.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import precision_of, print_machine, tb_scalars


def run(runs: Path, preset: str, steps: int, micro: str, precision: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", "trainlab", "multiply", "train", "--preset", preset, "--runs-dir", str(runs),
           "--max-steps", str(steps), "--log-every", "5", "--eval-every", str(10**9), "--save-every", str(10**9),
           "--eval-samples", "10", "--micro-batch", micro, "--precision", precision, "--no-progress",
           "--run-name", "bench"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if "--micro-batch auto" in line or "--precision auto" in line:
            print("   ", line)
    print(f"    --micro-batch {micro}, --precision {precision}: trained in {precision_of(out)}")
    speeds = {}
    for member in ("simple", "latent"):
        values = [v for _, v in tb_scalars(runs / "parallel_comparison" / "bench" / member, "perf/examples_per_sec")]
        speeds[member] = statistics.median(values[2:] or values)
    return speeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="multiply-3digit")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--micro", default="off,auto", help="--micro-batch settings, comma-separated")
    ap.add_argument("--precision", default="fp32", help="--precision of every run (auto: timed per run)")
    args = ap.parse_args()
    print_machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for micro in args.micro.split(","):
            rows.append((micro, run(Path(tmp) / micro, args.preset, args.steps, micro, args.precision)))
    print(f"\n{args.preset}, {args.steps} steps, --precision {args.precision}: examples/s of each model's own "
          f"training time")
    base = rows[0][1]
    for micro, speeds in rows:
        print(f"  --micro-batch {micro:5s} " + "  ".join(
            f"{m} {v:8.0f} ({v / base[m]:.2f}x)" for m, v in speeds.items()))


if __name__ == "__main__":
    main()
