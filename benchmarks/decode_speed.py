"""`chat generate` from the command's start to its last character: the plain pass against the
compiled one and the row kernels (``--decode plain|compiled|kernels``), the compiled one with
a cold cache (the first start on a machine) and a warm one, the kernels before and after
their one build, for the 14M model and chat-20min's (4 x 256), each as a
fraction of the floor measured on the idle machine: the weights' bytes over the rate it
reads that many bytes again and again, one pass a character.

    python benchmarks/decode_speed.py                     # 2,000 characters a run
    python benchmarks/decode_speed.py --chars 500 --presets chatgot-14m

Each run is a fresh process, as a user starts it. Per run: the wall time from start to exit,
the seconds before the first character (loading, and compiling when it does), and the
characters per second after the first one. The model's quality does not change its speed,
so models trained for one step serve. Also printed: one pass of each kind timed in this
process (the median of 200), so the gap between a pass and the command's rate shows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import memory_bandwidth, print_machine, scratch_dir

ROOT = Path(__file__).resolve().parents[1]


def train_one_step(runs: str, preset: str, text: Path) -> str:
    subprocess.run([sys.executable, "-m", "trainlab", "chat", "train", "--text", str(text), "--runs-dir", runs,
                    "--preset", preset, "--max-steps", "1", "--run-name", preset, "--no-progress", "--eval-every",
                    "1000", "--sample-every", "0", "--precision", "fp32", "--batch-size", "4"],
                   check=True, capture_output=True)
    return preset


def generate(runs: str, run: str, decode: str, chars: int) -> dict:
    """One `chat generate` in a fresh process: wall seconds, seconds to the first character,
    characters/s after it, and its stderr's decoding line."""
    cmd = [sys.executable, "-m", "trainlab", "chat", "generate", "--checkpoint", run, "--runs-dir", runs,
           "--decode", decode, "--max-new-tokens", str(chars), "--stop-at", "none", "--seed", "0"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first, n = None, 0
    while True:
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            break
        if first is None:
            first = time.perf_counter()
        n += len(chunk.decode("utf-8", "replace"))
    last = time.perf_counter()
    err = p.stderr.read().decode()
    if p.wait() != 0:
        raise SystemExit(f"chat generate failed: {err[-500:]}")
    wall = time.perf_counter() - t0
    line = next((x for x in err.splitlines() if x.startswith("decoding:")), "decoding: plain pass")
    return {"wall": wall, "first": first - t0, "rate": (n - 1) / max(1e-9, last - first), "chars": n, "line": line}


def pass_times(runs: str, run: str) -> dict[str, float]:
    """Milliseconds of one pass at position 200, plain, compiled and through the row kernels, in
    this process."""
    import statistics

    import torch

    from trainlab.chat.decoding import Decoder, RowCache
    from trainlab.chat.loading import load_chat_model
    from trainlab.engine.tracking import resolve_checkpoint

    model = load_chat_model(resolve_checkpoint(runs, "chat", run), torch.device("cpu")).model.eval()
    out = {}
    with torch.no_grad():
        for name, compiled, kernels in (("plain", False, False), ("compiled", True, False), ("kernels", True, True)):
            decoder = Decoder(model, compiled=compiled, cache_root=Path(runs) / ".compiled", kernels=kernels)
            decoder.prepare()
            cache = RowCache(model)
            cache.fill(model, [1] * min(200, model.cfg.context_len - 1))
            times = []
            for i in range(220):
                cache.length = min(200, model.cfg.context_len - 1)
                t = time.perf_counter()
                cache.step(decoder, 1)
                if i >= 20:
                    times.append(time.perf_counter() - t)
            out[name] = 1000 * statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="chatgot-14m,chat-20min")
    ap.add_argument("--chars", type=int, default=2000)
    ap.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    args = ap.parse_args()
    print_machine()
    runs = scratch_dir("decode-speed-")
    import torch

    from trainlab.chat.loading import load_chat_model
    from trainlab.engine.tracking import resolve_checkpoint

    for preset in args.presets.split(","):
        run = train_one_step(runs, preset, args.text)
        model = load_chat_model(resolve_checkpoint(runs, "chat", run), torch.device("cpu")).model
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        bandwidth = memory_bandwidth(weights)  # the idle machine reading that many bytes again and again
        floor = bandwidth / weights  # characters/s
        print(f"\n{preset}: {weights / 1e6:.1f} MB of weights read at {bandwidth / 1e9:.1f} GB/s; floor "
              f"{1000 / floor:.2f} ms a pass, "
              f"{floor:,.0f} characters/s", flush=True)
        shutil.rmtree(Path(runs) / ".compiled", ignore_errors=True)
        for label, decode in (("plain", "plain"), ("compiled, cold cache", "compiled"),
                              ("compiled, warm cache", "compiled"), ("kernels, cold build", "kernels"),
                              ("kernels, built", "kernels"), ("plain, again", "plain")):
            r = generate(runs, run, decode, args.chars)
            print(f"  {label:22s} wall {r['wall']:6.1f} s, first character after {r['first']:5.1f} s, "
                  f"{r['rate']:5.0f} characters/s ({r['rate'] / floor:.2f} of the floor) | {r['line']}", flush=True)
        ms = pass_times(runs, run)
        print("  one pass in process: " + ", ".join(f"{k} {v:.2f} ms ({1000 / v / floor:.2f} of the floor)"
                                                  for k, v in ms.items()), flush=True)


if __name__ == "__main__":
    main()
