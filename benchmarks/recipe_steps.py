"""Recipes compared at equal steps: a cheaper way to search for the recipe a slow CPU's budget
affords. A 20-minute fp32 run on a 2-core AVX-512-BF16 CPU trains about 1,500 steps of
``chat-20min``; the same 1,500 steps in bf16 read the same characters in about half the time.
So a candidate is first tried here at a fixed step count, in fresh processes, as a user would:

    trainlab chat train --preset chat-20min --max-steps 1500 --precision bf16 --text T [changes]

and the one that wins is then confirmed at equal minutes in fp32 (``auto_recipe.py``). A
recipe is a preset with changed settings, as in ``auto_recipe.py``
(``chat-20min+lr=0.015+min-lr-ratio=0``). It prints, per recipe, the loss over the whole val
span (the report's figure) and the wall time. Results go to ``--out`` after every run;
a rerun with the same ``--out`` skips the runs already there.

    python benchmarks/recipe_steps.py --steps 1500 --precision bf16 \\
        --recipes "chat-20min,chat-20min+lr=0.015" --out results/auto/steps-avx512-bf16.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from auto_recipe import CORPORA, variant  # noqa: E402
from common import print_machine, scratch_dir  # noqa: E402

from trainlab.engine.precision import cpu_summary  # noqa: E402


def one_run(recipe: str, steps: int, precision: str, text: str, runs_dir: str, seed: int) -> dict:
    preset, flags = variant(recipe)
    name = f"steps-{time.strftime('%H%M%S')}"
    cmd = [sys.executable, "-m", "trainlab", "chat", "train", "--preset", preset, "--max-steps", str(steps),
           "--precision", precision, "--seed", str(seed), "--text", text, "--runs-dir", runs_dir,
           "--run-name", name, "--no-progress", "--tag", "benchmark", *flags]
    t = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t
    if out.returncode != 0:
        raise SystemExit(f"{recipe}: exit {out.returncode}: {out.stderr.strip()[-500:]}")
    folder = Path(runs_dir) / "chat" / name
    report = (folder / "report.md").read_text()
    m = re.search(r"whole val span: \*\*([\d.]+)\*\*", report)
    return {"recipe": recipe, "steps": steps, "precision": precision, "seed": seed,
            "val_span_loss": float(m.group(1)) if m else None, "wall_seconds": round(wall, 1),
            "command": " ".join(cmd[1:]), "machine": cpu_summary(), "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--corpus", default="tinyshakespeare", help=f"of {', '.join(CORPORA)}, or a path")
    ap.add_argument("--recipes", required=True, help="comma-separated, each a preset with +changes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="JSON file of the results (resumable)")
    args = ap.parse_args()
    text = CORPORA.get(args.corpus, Path(args.corpus))
    if not Path(text).is_file():
        raise SystemExit(f"recipe_steps: no corpus at {text}")
    print_machine()
    runs_dir = scratch_dir("recipe-steps-")
    done: list[dict] = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else []
    for recipe in args.recipes.split(","):
        key = {"recipe": recipe, "steps": args.steps, "precision": args.precision, "seed": args.seed}
        if not any(all(r.get(k) == v for k, v in key.items()) for r in done):
            done.append({"corpus": args.corpus, **one_run(recipe, args.steps, args.precision, str(text), runs_dir,
                                                          args.seed)})
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(done, indent=1) + "\n")
        r = next(r for r in done if all(r.get(k) == v for k, v in key.items()))
        print(f"{recipe:>60} {args.precision} {args.steps} steps: val span {r['val_span_loss']}, "
              f"wall {r['wall_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
