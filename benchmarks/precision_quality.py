"""What bf16 costs in quality and gains in time, side by side: chat recipes trained in each
precision on tinyshakespeare, several seeds, scored on the whole val span.

    python benchmarks/precision_quality.py                                  # fast-cpu and nanogpt-cpu, 2 seeds
    python benchmarks/precision_quality.py --recipes fast --precisions fp32,bf16,auto --seeds 0,1,2

Every (recipe, seed) trains once per precision, one run after another (never two torch
jobs at once). A run's figures: its wall time from launch, the precision it trained in
(for ``auto``, what the timing picked), and the loss of its last checkpoint over every
non-overlapping val window (``time_to_quality.whole_val_loss``: no sampling noise). The
summary compares each precision's mean loss with fp32's against the spread between seeds:
a difference inside that spread is not a cost this many seeds can show.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import print_machine
from time_to_quality import RECIPES, ROOT, run_trainlab, whole_val_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="fast,nanogpt-cpu", help=f"comma-separated, of: {', '.join(RECIPES)}")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    args = ap.parse_args()
    print_machine()
    text = args.text.read_text(encoding="utf-8")
    precisions, seeds = args.precisions.split(","), [int(s) for s in args.seeds.split(",")]
    results: dict[tuple[str, str], list[float]] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes.split(","):
            for seed in seeds:
                for precision in precisions:
                    name = f"{recipe}-{precision}-{seed}"
                    flags = [*RECIPES[recipe], "--precision", precision, "--seed", str(seed)]
                    _, _, wall, run_dir, mode = run_trainlab(args.text, flags, Path(tmp), 0.0, name)
                    loss = whole_val_loss(run_dir, text)
                    results.setdefault((recipe, precision), []).append(loss)
                    rows.append((recipe, precision, seed, wall, loss, mode))
                    print(f"  {recipe:12s} {precision:5s} seed {seed}: {wall:6.1f} s, whole-val loss {loss:.4f}  "
                          f"[{mode}]", flush=True)
    print(f"\n{'recipe':12s} {'precision':9s} {'mean loss':>9s} {'seeds':>17s} {'vs fp32':>8s} {'mean s':>7s}")
    for recipe in args.recipes.split(","):
        base = results.get((recipe, "fp32"))
        spread = max(base) - min(base) if base and len(base) > 1 else None
        for precision in precisions:
            losses = results[(recipe, precision)]
            walls = [r[3] for r in rows if r[0] == recipe and r[1] == precision]
            diff = statistics.mean(losses) - statistics.mean(base) if base else float("nan")
            print(f"{recipe:12s} {precision:9s} {statistics.mean(losses):9.4f} "
                  f"{' '.join(f'{x:.4f}' for x in losses):>17s} {diff:+8.4f} {statistics.mean(walls):7.1f}")
        if spread is not None:
            for precision in precisions:
                if precision == "fp32":
                    continue
                diff = statistics.mean(results[(recipe, precision)]) - statistics.mean(base)
                verdict = "within" if abs(diff) <= spread else "BEYOND"
                print(f"  {recipe} {precision}: {diff:+.4f} against fp32, {verdict} fp32's seed spread of {spread:.4f}")


if __name__ == "__main__":
    main()
