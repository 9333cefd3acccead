"""glibc's malloc against tcmalloc for a training step (src/trainlab/allocator.py).

    python benchmarks/allocator.py [--preset chat-20min] [--precisions fp32,bf16] [--rounds 4]

Which malloc a process uses is fixed when it starts, so each figure comes from a fresh child
process, the two mallocs alternated round by round (the machines are shared and noisy: only
figures taken side by side mean much). Each child prints, for one fresh (32, 128, 688) fp32
product, the milliseconds and the page faults it took, beside the floor (the output written
once over the measured bandwidth), and the engine's seconds per training step of the preset
(8 steps after 3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from common import memory_bandwidth
from trainlab import allocator, runs
from trainlab.engine.step import seconds_per_step
preset, precision, text = sys.argv[2], sys.argv[3], sys.argv[4]
x, y = torch.randn(32, 128, 688), torch.randn(32, 128, 688)
for _ in range(3):
    x * y
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = time.perf_counter()
for _ in range(30):
    z = x * y
    del z
product = (time.perf_counter() - t) / 30
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 30
floor = x.numel() * 4 / memory_bandwidth()
values = runs.settings("chat", preset, None, {"text": text, "precision": precision})
cfgs, task = runs.checked_task("chat", {**values, "max_steps": 1, "minutes": None})
step = seconds_per_step(task, cfgs["train"], None, 8, 3)
print(json.dumps({"malloc": allocator.loaded() or "glibc", "product_ms": product * 1e3, "faults": faults,
                  "floor_ms": floor * 1e3, "step_ms": step * 1e3}))
"""


def child(malloc: str, preset: str, precision: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TRAINLAB_PRELOADED")}
    env["TRAINLAB_MALLOC"] = malloc
    # the child is started as the trainlab command starts itself: use_tcmalloc() first
    code = "from trainlab.allocator import use_tcmalloc; use_tcmalloc()\n" + CHILD
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks"), preset, precision, str(TEXT)],
                         env={**env, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="chat-20min")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    from common import print_machine

    print_machine()
    from trainlab.allocator import find_tcmalloc

    if find_tcmalloc() is None:
        sys.exit("no tcmalloc on this machine: apt install libtcmalloc-minimal4")
    for precision in args.precisions.split(","):
        got = {"system": [], "auto": []}
        for _ in range(args.rounds):
            for malloc in got:
                got[malloc].append(child(malloc, args.preset, precision))
        med = {m: {k: statistics.median(r[k] for r in rs) for k in ("product_ms", "faults", "step_ms", "floor_ms")}
               for m, rs in got.items()}
        g, t = med["system"], med["auto"]
        rounds = {m: ", ".join(f"{r['step_ms']:.0f}" for r in rs) for m, rs in got.items()}
        print(f"{args.preset} {precision}, median of {args.rounds} alternated rounds "
              f"(children: {got['system'][0]['malloc']} / {got['auto'][0]['malloc']}):")
        print(f"  fresh (32, 128, 688) product: glibc {g['product_ms']:.2f} ms ({g['faults']:.0f} page faults), "
              f"tcmalloc {t['product_ms']:.2f} ms ({t['faults']:.0f}); floor {t['floor_ms']:.2f} ms")
        print(f"  training step: glibc {g['step_ms']:.0f} ms, tcmalloc {t['step_ms']:.0f} ms: "
              f"{g['step_ms'] / t['step_ms']:.2f}x (rounds: {rounds['system']} / {rounds['auto']})", flush=True)


if __name__ == "__main__":
    main()
