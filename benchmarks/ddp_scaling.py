"""DDP scaling on CPU: the same chat training on 1 process and under torchrun on N.

    python benchmarks/ddp_scaling.py                      # nanogpt-cpu preset, 1 vs 2 processes
    python benchmarks/ddp_scaling.py --steps 40 --nproc 2 --batch-size 32

The single process gets every core (OMP_NUM_THREADS = cores); each of the N processes
gets cores / N threads, so both use the whole machine. Both run the same global batches
with dropout 0, so the training loss must agree step for step to float tolerance: the
script prints tokens/s for each, the speed-up, and the largest loss difference.
The corpus is ``../shared/data/tinyshakespeare.txt`` unless --text says otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import print_machine, tb_scalars

ROOT = Path(__file__).resolve().parents[1]


def train(runs: Path, text: Path, nproc: int, threads: int, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Per-step examples/s and training losses, read back from the run's TensorBoard events."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                "-m", "trainlab"] if nproc > 1 else [sys.executable, "-m", "trainlab"]
    cmd = [*launcher, "chat", "train", "--text", str(text), "--runs-dir", str(runs), "--preset", args.preset,
           "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--dropout", "0", "--log-every", "1",
           "--eval-every", str(10**9), "--save-every", str(10**9), "--sample-every", "0", "--eval-batches", "1",
           "--precision", "fp32", "--device", "cpu", "--no-progress", "--run-name", "bench"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    folder = runs / "chat" / "bench" / "gpt"
    return ([v for _, v in tb_scalars(folder, "perf/examples_per_sec")], [v for _, v in tb_scalars(folder, "train/loss")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="nanogpt-cpu")
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    args = ap.parse_args()
    print_machine()
    cores = os.cpu_count() or 1
    from trainlab.config import load_preset

    context = int(load_preset("chat", args.preset).get("context_len", 256))
    with tempfile.TemporaryDirectory() as tmp:
        one = train(Path(tmp) / "one", args.text, 1, cores, args)
        many = train(Path(tmp) / "many", args.text, args.nproc, max(1, cores // args.nproc), args)
    print(f"\n{args.preset}, batch {args.batch_size} x context {context}, {args.steps} steps, {cores} cores, fp32; "
          f"median tokens/s over the steps after the first two")
    speeds = []
    for name, (per_sec, _) in ((f"1 process x {cores} threads", one),
                               (f"{args.nproc} processes x {max(1, cores // args.nproc)} threads", many)):
        speeds.append(statistics.median(per_sec[2:]) * context)
        print(f"  {name:28s} {speeds[-1]:9.0f} tokens/s")
    print(f"  speed-up {speeds[1] / speeds[0]:.2f}x; largest training-loss difference over {len(one[1])} steps: "
          f"{max(abs(a - b) for a, b in zip(one[1], many[1])):.2e}")


if __name__ == "__main__":
    main()
