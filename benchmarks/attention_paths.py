"""Causal attention of a training pass on the CPU: the fused kernel against the written-out one.

    python benchmarks/attention_paths.py

``scaled_dot_product_attention``'s CPU flash kernel is fast forward, but its backward in
bf16 was 4-5x slower than three plain matmuls at the chat presets' sizes (an AMX Xeon), so
``chat.model.causal_attend`` takes training passes on a CPU in bf16 or fp16
(``written_out_is_faster``). This prints, for each shipped chat shape and precision,
milliseconds of one forward and backward of each path (the best of 3 rounds of 10, the two
paths alternated in each round) and their ratio, beside the floor: the pass's matmul FLOPs
over this machine's measured matmul rate in that precision.

With dropout (``--dropout 0.1``, the chat presets' rate) a training pass cannot take the fused
kernel on a CPU, so it runs the written-out product with a dropout mask on the attention
weights; a third column times that, the path every chat preset's training takes today:

    python benchmarks/attention_paths.py --dropout 0.1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import matmul_rate, print_machine  # noqa: E402

from trainlab.chat.model import causal_attend  # noqa: E402

# (what, batch, heads, context, head width) of the shipped chat presets
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
SHAPES = [("chat-quick", 16, 4, 128, 32), ("chat-90s", 64, 4, 64, 48), ("chat-20min", 32, 4, 128, 64),
          ("chat-20min-ctx256", 16, 4, 256, 64), ("chatgot-14m", 16, 6, 256, 64)]


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def written_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return causal_attend(q, k, v, 0.0)


def timed(fn, q, k, v, g, n: int = 10) -> float:
    t = time.perf_counter()
    for _ in range(n):
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(g)
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dropout", type=float, default=0.0, help="also time the written-out path with this dropout")
    args = ap.parse_args()
    p = args.dropout

    def dropped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return causal_attend(q, k, v, p)

    print_machine()
    rates = {dt: matmul_rate(1024, dt) for dt in (torch.float32, torch.bfloat16)}
    print(f"matmul rate (1024^3): fp32 {rates[torch.float32] / 1e9:.0f} GFLOP/s, "
          f"bf16 {rates[torch.bfloat16] / 1e9:.0f} GFLOP/s")
    paths = [fused, written_out] + ([dropped] if p else [])
    print(f"{'shape':<26} {'dtype':<5} {'fused ms':>9} {'written ms':>11} {'fused/written':>14} {'floor ms':>9}"
          + (f" {f'dropout {p:g} ms':>16} {'/ fused':>8}" if p else ""))
    torch.manual_seed(0)
    for what, B, H, T, hd in SHAPES:
        for dt in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(B, H, T, hd, dtype=dt, requires_grad=True) for _ in range(3))
            g = torch.randn(B, H, T, hd, dtype=dt)
            for fn in paths:
                timed(fn, q, k, v, g, 2)  # warm-up
            best = {fn: float("inf") for fn in paths}
            for _ in range(3):
                for fn in paths:
                    best[fn] = min(best[fn], timed(fn, q, k, v, g))
            # forward: q k^T and att v (2 B H T^2 hd FLOPs each); backward twice that
            flops = 3 * 2 * (2 * B * H * T * T * hd)
            floor = flops / rates[dt]
            print(f"{what:<26} {NAMES[dt]:<5} {1e3 * best[fused]:>9.2f} "
                  f"{1e3 * best[written_out]:>11.2f} {best[fused] / best[written_out]:>13.2f}x {1e3 * floor:>9.3f}"
                  + (f" {1e3 * best[dropped]:>16.2f} {best[dropped] / best[fused]:>7.2f}x" if p else ""))


if __name__ == "__main__":
    main()
