"""Build the 1-3 digit multiplication dataset (998,001 problems) and print time and memory.

Target: under 1 second and under 50 MB. Run: python benchmarks/multiply_dataset.py
Building includes counting every split (which hashes all 998,001 pairs) and encoding one batch.
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
from common import print_machine  # noqa: E402

from trainlab.multiply.config import MultiplyDataConfig  # noqa: E402
from trainlab.multiply.data import MultiplicationDataset


def main() -> None:
    print_machine()
    tracemalloc.start()
    t0 = time.perf_counter()
    ds = MultiplicationDataset(MultiplyDataConfig(min_digits=1, max_digits=3))
    counts = ds.split_counts()
    batch = ds.encode(ds.sample("train", 256, np.random.default_rng(0)))
    seconds = time.perf_counter() - t0
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"problems: {len(ds):,} ({counts['train']:,} train, {counts['val']:,} val, {counts['test']:,} test)")
    print(f"build + count splits + one batch: {seconds:.3f} s (target < 1 s)")
    print(f"peak Python/NumPy memory while building: {peak / 2**20:.1f} MB (target < 50 MB); "
          f"held afterwards: {current / 2**20:.2f} MB")
    print(f"batch shapes: src {tuple(batch['src'].shape)}, tgt {tuple(batch['tgt_out'].shape)}")


if __name__ == "__main__":
    main()
