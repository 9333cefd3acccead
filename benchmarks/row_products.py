"""The row kernels' products of one 14M pass (8 blocks of 384: qkv, attention out, MLP up and
down; the weights packed as `RowsModel` holds them) for 1 and 8 rows, against a sum over the
same bytes, at 2 and 1 threads alternating: how near reading the weights a pass's products
get, and whether the kernels use the threads they are given.

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
    ap.add_argument("--rows", default="1,8", help="rows a product computes, in turn (8: a server's 8 streams)")
    args = ap.parse_args()
    print_machine()
    from trainlab.chat.kernels import load_kernels

    kernels, note = load_kernels(args.kernels_root)
    print(note, flush=True)
    if kernels is None:
        raise SystemExit(1)
    shapes = [(1152, 384), (384, 384), (1536, 384), (384, 1536)] * 8  # (N, K) of each product, 8 blocks
    weights = [kernels.pack_linear(torch.randn(n, k)) for n, k in shapes]
    flat = torch.cat([w.flatten() for w in weights])
    nbytes = flat.numel() * 4
    macs = sum(n * k for n, k in shapes)

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
                for rows in (int(r) for r in args.rows.split(",")):
                    x = {k: torch.randn(rows, k) for _, k in shapes}
                    p = best(lambda: [kernels.packed_linear(x[k], w, n) for (n, k), w in zip(shapes, weights)])
                    s = best(flat.sum)
                    print(f"threads {threads}, {rows} row(s): {nbytes / 1e6:.1f} MB, 32 products {1e3 * p:.2f} ms "
                          f"({nbytes / p / 1e9:.1f} GB/s, {2 * rows * macs / p / 1e9:.0f} GFLOP/s), a sum over the "
                          f"same bytes {1e3 * s:.2f} ms: {s / p:.2f} of reading them", flush=True)
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":
    main()
