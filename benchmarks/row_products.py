"""The row kernels' products of one 14M pass (8 blocks of 384: qkv, attention out, MLP up and
down; the weights packed as `RowsModel` holds them) for one row, against a sum over the same
bytes, at 2 and 1 threads alternating: how near reading the weights a one-row pass gets, and
whether the kernels use the threads they are given.

    python benchmarks/row_products.py --kernels-root /tmp/tl/sl-runs/.compiled --rounds 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import print_machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels-root", type=Path, default=Path("runs") / ".compiled",
                    help="where the row kernels are built and kept (a runs folder's .compiled)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print_machine()
    from trainlab.chat.kernels import load_kernels

    kernels, note = load_kernels(args.kernels_root)
    print(note, flush=True)
    if kernels is None:
        raise SystemExit(1)
    shapes = [(1152, 384), (384, 384), (1536, 384), (384, 1536)] * 8  # (N, K) of each product, 8 blocks
    weights = [kernels.pack_linear(torch.randn(n, k)) for n, k in shapes]
    x = {k: torch.randn(1, k) for _, k in shapes}
    flat = torch.cat([w.flatten() for w in weights])
    nbytes = flat.numel() * 4

    def products() -> None:
        for (n, k), w in zip(shapes, weights):
            kernels.packed_linear(x[k], w, n)

    def best(fn, n: int = 30) -> float:
        fastest = float("inf")
        for _ in range(n):
            t = time.perf_counter()
            fn()
            fastest = min(fastest, time.perf_counter() - t)
        return fastest

    previous = torch.get_num_threads()
    try:
        for _ in range(args.rounds):
            for threads in (2, 1):
                torch.set_num_threads(threads)
                p, s = best(products), best(flat.sum)
                print(f"threads {threads}: {nbytes / 1e6:.1f} MB, 32 products 1 row {1e3 * p:.2f} ms "
                      f"({nbytes / p / 1e9:.1f} GB/s), sum over the same bytes {1e3 * s:.2f} ms "
                      f"({nbytes / s / 1e9:.1f} GB/s): {s / p:.2f} of reading them", flush=True)
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":
    main()
