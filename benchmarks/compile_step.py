"""Is ``--compile`` worth its start-up for a recipe? Its training steps against eager ones, side
by side: fresh ``trainlab chat train --preset P --max-steps N`` processes, eager and compiled
taking turns (``--rounds``), so a slow spell of a shared machine falls on both.

    python benchmarks/compile_step.py --preset chat-20min --precision fp32 --steps 40 --rounds 2

Per contender it prints the median seconds of a step (from the run's own
``perf/examples_per_sec``, the steps after the first ``--skip``), the wall time of the whole
command (the compiled one includes compiling: cold in its first round unless the cache is warm,
warm after), and the floor: the step's FLOPs (``auto.flops_per_char`` times the characters of a
step) over this machine's measured matmul rate in that precision. A budgeted run (``--minutes``)
gains from compiling only if the steps saved outweigh the seconds it costs at start-up; the
last line says after how many steps that happens.

The recipe's own dropout is kept: eager it is trainlab's CPU mask (engine/dropout.py), compiled
it is PyTorch's dropout fused into the graph, so the two do the same work a real run does.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from common import matmul_rate, precision_of, print_machine, tb_scalars  # noqa: E402

from trainlab.auto import chars_per_step, flops_per_char  # noqa: E402
from trainlab.config import load_preset  # noqa: E402


def one_run(preset: str, steps: int, precision: str, compiled: bool, text: Path, work: Path, name: str) -> dict:
    cmd = [sys.executable, "-m", "trainlab", "chat", "train", "--preset", preset, "--max-steps", str(steps),
           "--precision", precision, "--text", str(text), "--runs-dir", str(work), "--run-name", name,
           "--log-every", "1", "--eval-every", str(10**9), "--save-every", str(10**9), "--sample-every", "0",
           "--eval-batches", "1", "--no-progress", *(["--compile"] if compiled else [])]
    t = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t
    if out.returncode != 0:
        raise SystemExit(f"compile_step: {' '.join(cmd[1:])}: exit {out.returncode}: {out.stderr.strip()[-400:]}")
    per_sec = tb_scalars(work / "chat" / name / "gpt", "perf/examples_per_sec")
    return {"step_seconds": [1 / v for _, v in per_sec], "wall": wall, "precision": precision_of(out.stdout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="chat-20min")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of the median (warm-up)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    args = ap.parse_args()
    print_machine()
    values = load_preset("chat", args.preset)
    batch = int(values["batch_size"])
    flops = flops_per_char({**values, "vocab_size": 65}) * chars_per_step(values)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    rate = matmul_rate(1024, dtype)
    print(f"{args.preset}: {chars_per_step(values):,} characters a step, {flops / 1e9:.1f} GFLOP a step; "
          f"{args.precision} matmul rate {rate / 1e9:.0f} GFLOP/s: floor {1000 * flops / rate:.0f} ms a step",
          flush=True)
    steps: dict[str, list[float]] = {"eager": [], "compiled": []}
    walls: dict[str, list[float]] = {"eager": [], "compiled": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in ("eager", "compiled"):
                got = one_run(args.preset, args.steps, args.precision, name == "compiled", args.text, Path(tmp),
                              f"{name}-{r}")
                # examples/s is logged per step, in rows (the batch), not characters
                secs = [s * batch for s in got["step_seconds"][args.skip:]]
                steps[name].append(statistics.median(secs))
                walls[name].append(got["wall"])
                print(f"  round {r} {name:8s} {1000 * steps[name][-1]:7.0f} ms a step, {got['wall']:6.1f} s the "
                      f"command ({args.steps} steps), {got['precision']}", flush=True)
    eager, comp = statistics.median(steps["eager"]), statistics.median(steps["compiled"])
    print(f"\nmedian over {args.rounds} alternating rounds ({args.precision}, {args.steps} steps, first {args.skip} "
          f"left out):")
    for name, sec in (("eager", eager), ("compiled", comp)):
        print(f"  {name:8s} {1000 * sec:7.0f} ms a step ({flops / sec / 1e9:5.0f} GFLOP/s, {flops / rate / sec:.2f} "
              f"of the floor); commands {', '.join(f'{w:.1f}' for w in walls[name])} s")
    print(f"  compiled / eager: {comp / eager:.3f} of the step time")
    extra = statistics.median(w_c - w_e for w_c, w_e in zip(walls["compiled"][1:] or walls["compiled"],
                                                            walls["eager"][1:] or walls["eager"]))
    if comp < eager:
        saved = eager - comp
        print(f"  start-up: the compiled command took {extra:+.1f} s more for {args.steps} steps "
              f"(warm cache where rounds > 1); compiling pays after about "
              f"{max(0.0, (extra + args.steps * saved) / saved):.0f} steps")
    else:
        print("  compiling does not make the step faster here")


if __name__ == "__main__":
    main()
