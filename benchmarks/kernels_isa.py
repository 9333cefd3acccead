"""Whether the row kernels give the same bits built for AVX-512, for AVX2 and as plain C++:
the products and attention are written so (each output a chain of FMAs in a fixed order,
``v_exp`` and ``v_hsum`` the same operations on every ISA), and this checks it on one
machine by building all three (``-mno-avx512f``, then also ``-mno-avx2 -mno-fma``; about
40 s each the first time) and comparing ``rows_attend`` (head widths 8 and 64: both of its
paths) and ``rows_linear`` bit for bit. Too slow for the test suite; a check to run after
changing the kernels' arithmetic.

    python benchmarks/kernels_isa.py --kernels-root /tmp/kernels-isa
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import print_machine

VARIANTS = {"native": [], "AVX2": ["-mno-avx512f"], "plain C++": ["-mno-avx512f", "-mno-avx2", "-mno-fma"]}


def outputs(kernels) -> list[torch.Tensor]:
    """rows_attend at head widths 8 and 64 and rows_linear, on fixed seeded inputs."""
    def randn(*shape: int, seed: int) -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

    got = []
    for hd in (8, 64):
        keys, values = randn(4, 3, 40, hd, seed=1), randn(4, 3, 40, hd, seed=2)
        q, k, v = (randn(3, 3, hd, seed=s) * 2 for s in (3, 4, 5))
        got.append(kernels.rows_attend(q, k, v, keys, values, torch.tensor([3, 0, 2]), torch.tensor([0, 39, 17]), 0.5))
    got.append(kernels.rows_linear(randn(5, 384, seed=6), randn(1000, 384, seed=7)))
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels-root", type=Path, default=Path("/tmp/kernels-isa"))
    args = ap.parse_args()
    print_machine()
    import trainlab.chat.kernels as K

    cflags, ldflags = K.build_flags()
    flags_of = K.build_flags
    results = {}
    try:
        for name, extra in VARIANTS.items():
            K.build_flags = lambda extra=extra: (cflags[:2] + extra + cflags[2:], ldflags)  # after -O3 -march=native
            kernels, note = K.load_kernels(args.kernels_root)
            print(f"{name}: {note}", flush=True)
            if kernels is None:
                raise SystemExit(1)
            results[name] = outputs(kernels)
    finally:
        K.build_flags = flags_of
    names = ["rows_attend, head width 8", "rows_attend, head width 64", "rows_linear"]
    same = True
    for name, got in results.items():
        for what, a, b in zip(names, got, results["native"]):
            equal = torch.equal(a, b)
            same &= equal
            print(f"{name}: {what}: " + ("the same bits as native" if equal else
                                         f"differs from native by up to {(a - b).abs().max().item():.1e}"))
    print("all builds agree bit for bit" if same else "the builds disagree")
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
