"""How many characters one scoring pass should hold on a CPU (``chat/task.py``, ``SCORE_CHARS``).

Evaluations and the report's whole-span loss run forward passes over many windows. This times
the same windows (as many as tinyshakespeare's val span holds) scored in passes of 512 to
16,384 characters (windows x context), in fp32 and under bf16 autocast, for the models of
``chat-1min`` (context 64) and ``chat-20min`` (context 256), in rounds so that a slow spell of
a shared machine falls on every size alike. It prints seconds per size (the best of the
rounds) and each size's time against the fastest. The floor: the forward's matrix FLOPs over
a large product's measured rate.

    python benchmarks/scoring_rows.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from common import print_machine  # noqa: E402

from trainlab.chat.config import GPTConfig  # noqa: E402
from trainlab.chat.model import GPT  # noqa: E402

SIZES = (512, 1024, 2048, 4096, 8192, 16384)
VAL_CHARS = 111_539  # tinyshakespeare's val span


def model_of(preset: str) -> GPT:
    y = yaml.safe_load((ROOT / "src" / "trainlab" / "presets" / "chat" / f"{preset}.yaml").read_text())
    cfg = GPTConfig(vocab_size=65, **{k: v for k, v in y.items() if k in GPTConfig.__dataclass_fields__})
    return GPT(cfg).eval()


@torch.no_grad()
def score(model: GPT, ids: torch.Tensor, chars: int, bf16: bool) -> float:
    """Seconds to score every window of ``ids`` (N, ctx + 1), ``chars // ctx`` windows a pass."""
    rows = max(1, chars // (ids.shape[1] - 1))
    t = time.perf_counter()
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        for i in range(0, len(ids), rows):
            b = ids[i:i + rows]
            logits, _ = model(b[:, :-1])  # (rows, ctx, vocab)
            F.cross_entropy(logits.flatten(0, 1).float(), b[:, 1:].flatten(), reduction="sum")
    return time.perf_counter() - t


def matmul_rate(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * n**3 / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print_machine()
    rate = matmul_rate()
    print(f"fp32 matmul rate (2048^3): {rate / 1e9:.0f} GFLOP/s")
    g = torch.Generator().manual_seed(0)
    for preset in ("chat-1min", "chat-20min"):
        model = model_of(preset)
        ctx = model.cfg.context_len
        ids = torch.randint(0, 65, (VAL_CHARS // ctx, ctx + 1), generator=g)
        matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "emb" not in n
                       and "pair" not in n)
        flops = 2 * matrices * ids.shape[0] * ctx
        for bf16 in (False, True):
            score(model, ids, 4096, bf16)  # kernels built, caches warm
            best = {c: float("inf") for c in SIZES}
            for _ in range(args.rounds):  # each size once a round
                for c in SIZES:
                    best[c] = min(best[c], score(model, ids, c, bf16))
            fastest = min(best.values())
            shown = "  ".join(f"{c}: {t:.2f} s ({t / fastest:.2f}x)" for c, t in best.items())
            print(f"{preset} ({ctx}) {'bf16' if bf16 else 'fp32'}: {shown}; "
                  f"floor of the weights' products in fp32 {flops / rate:.2f} s", flush=True)


if __name__ == "__main__":
    main()
