"""Dropout on a CPU: PyTorch's mask against trainlab's (engine/dropout.py), side by side.

    python benchmarks/dropout_mask.py [--preset chat-20min] [--rounds 5]

Two parts, each alternating the two ways in every round (the machines are shared and noisy,
so only ratios measured together mean much):
1. one mask of each shape a chat-20min step draws (attention probabilities, the residual
   stream), ``F.dropout`` against ``engine.dropout.dropout``, beside the floor: writing the
   mask and the output once over this machine's measured bandwidth;
2. a whole training step of the preset (forward, backward, optimizer) in fp32 and bf16, with
   PyTorch's dropout (the fused attention kernel with its ``dropout_p`` in fp32, as before)
   against trainlab's: the milliseconds per step and the ratio;
3. a whole fp32 step of the preset as it is against the same with ``--attn-dropout 0``
   (dropout on the residual paths only, so attention takes the fused kernel).

    python benchmarks/dropout_mask.py --preset chat-1min-dropout --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import memory_bandwidth, print_machine  # noqa: E402

from trainlab import runs  # noqa: E402
from trainlab.chat import model as chat_model  # noqa: E402
from trainlab.engine import dropout as engine_dropout  # noqa: E402
from trainlab.engine.step import seconds_per_step  # noqa: E402

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def best_ms(fn, n: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def masks(rounds: int, batch: int, heads: int, ctx: int, d: int, p: float) -> None:
    bw = memory_bandwidth()
    print(f"read bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{'tensor':<34} {'dtype':<5} {'F.dropout ms':>13} {'trainlab ms':>12} {'ratio':>6} {'floor ms':>9}")
    for what, shape in [("attention probabilities", (batch, heads, ctx, ctx)), ("residual stream", (batch, ctx, d))]:
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, dtype=dt)
            theirs, ours = [], []
            for _ in range(rounds):
                theirs.append(best_ms(lambda: F.dropout(x, p), 10))
                ours.append(best_ms(lambda: engine_dropout.dropout(x, p), 10))
            floor = 2 * x.numel() * x.element_size() / bw * 1e3  # the mask and the output, written once
            a, b = statistics.median(theirs), statistics.median(ours)
            name = f"{what} {tuple(shape)}"
            print(f"{name:<34} {str(dt)[6:]:<5} {a:>13.2f} {b:>12.2f} {a / b:>6.2f} {floor:>9.2f}")


def pytorch_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    return F.dropout(x, p, training)


def steps(preset: str, rounds: int) -> None:
    """A whole step with each dropout: trainlab's modules call ``engine.dropout.dropout`` and the
    chat model picks its attention path by ``written_out_is_faster``; the "PyTorch" side swaps
    both back to what they were before (a benchmark's switch, not a model option)."""
    mine_drop, mine_path = engine_dropout.dropout, chat_model.written_out_is_faster

    def old_path(q: torch.Tensor, dropout: float = 0.0) -> bool:
        return mine_path(q, 0.0)

    print(f"{preset}: ms per training step (engine's own timing, 8 steps after 3), median of {rounds} rounds")
    for precision in ("fp32", "bf16"):
        values = runs.settings("chat", preset, None, {"text": str(TEXT), "precision": precision})
        cfgs, task = runs.checked_task("chat", {**values, "max_steps": 1, "minutes": None})
        theirs, ours = [], []
        for _ in range(rounds):
            engine_dropout.dropout, chat_model.drop, chat_model.written_out_is_faster = (
                pytorch_dropout, pytorch_dropout, old_path)
            theirs.append(seconds_per_step(task, cfgs["train"], None, 8, 3) * 1e3)
            engine_dropout.dropout, chat_model.drop, chat_model.written_out_is_faster = (
                mine_drop, mine_drop, mine_path)
            ours.append(seconds_per_step(task, cfgs["train"], None, 8, 3) * 1e3)
        a, b = statistics.median(theirs), statistics.median(ours)
        print(f"  {precision}: PyTorch's dropout {a:.0f} ms, trainlab's {b:.0f} ms: {a / b:.2f}x "
              f"(rounds: {', '.join(f'{x:.0f}' for x in theirs)} / {', '.join(f'{x:.0f}' for x in ours)})", flush=True)


def attention_off(preset: str, rounds: int) -> None:
    """A whole fp32 step with attention's dropout (the preset's) and without it (``--attn-dropout 0``)."""
    tasks = []
    for flags in ({}, {"attn_dropout": 0.0}):
        values = runs.settings("chat", preset, None, {"text": str(TEXT), "precision": "fp32", **flags})
        tasks.append(runs.checked_task("chat", {**values, "max_steps": 1, "minutes": None}))
    times: list[list[float]] = [[], []]
    for _ in range(rounds):
        for i, (cfgs, task) in enumerate(tasks):
            times[i].append(seconds_per_step(task, cfgs["train"], None, 8, 3) * 1e3)
    a, b = (statistics.median(t) for t in times)
    print(f"{preset}, fp32: with attention's dropout {a:.0f} ms a step, --attn-dropout 0 {b:.0f} ms: {a / b:.2f}x "
          f"(rounds: {', '.join(f'{x:.0f}' for x in times[0])} / {', '.join(f'{x:.0f}' for x in times[1])})",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="chat-20min")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print_machine()
    values = runs.settings("chat", args.preset, None, {"text": str(TEXT)})
    masks(args.rounds, values["batch_size"], values["nhead"], values["context_len"], values["d_model"],
          values["dropout"])
    steps(args.preset, args.rounds)
    if values["dropout"] > 0:
        attention_off(args.preset, args.rounds)


if __name__ == "__main__":
    main()
