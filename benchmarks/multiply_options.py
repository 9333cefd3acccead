"""What each of issue 27's options is worth at 3 digits, at equal training time: the plain
(``simple``) member trains on the ``multiply-3digit`` preset for the same minutes of
training steps in every variant (its step count fitted from its own measured step time,
after warm-up), over seeds, and is scored free-running on held-out 3x3-digit test problems.

    python benchmarks/multiply_options.py                          # every variant, 4 minutes, seeds 0 and 1
    python benchmarks/multiply_options.py --minutes 6 --variants base,abacus --seeds 0,1,2
    python benchmarks/multiply_options.py --members latent --out results/multiply-options-latent

Every variant starts from the preset as it was before the probes (``BEFORE``: natural
order, neither option; the preset now turns all three on) and changes only the options
named (``VARIANTS``): place-value embeddings (``--abacus``), the running-sum loss
(``--carry-loss``), and the answer order with them.
fp32 on every side, so the figures mean the same on every CPU. Each result is appended to
``OUT/results.json`` as it comes: the same command again skips what is there, so an
interrupted probe continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import print_machine, scratch_dir, train_for_minutes  # noqa: E402

from trainlab.engine.precision import cpu_summary  # noqa: E402
from trainlab.multiply.evaluation import evaluate_members
from trainlab.multiply.inference import evaluation_dataset  # noqa: E402

# the preset as it was before these probes (it now turns all three on), so that every
# variant names the whole of what it changes and the table can be made again
BEFORE = {"answer_order": "natural", "abacus": False, "carry_loss": 0.0}
VARIANTS = {
    "base": {},
    "abacus": {"abacus": True},
    "carry": {"carry_loss": 1.0},
    "abacus+carry": {"abacus": True, "carry_loss": 1.0},
    "reversed": {"answer_order": "reversed"},
    "reversed+carry": {"answer_order": "reversed", "carry_loss": 1.0},
    "reversed+abacus+carry": {"answer_order": "reversed", "abacus": True, "carry_loss": 1.0},
}


def run_one(variant: str, member: str, seed: int, minutes: float, runs_dir: str, test_n: int) -> dict:
    flags = {"runs_dir": runs_dir, "tag": "benchmark", "progress": False, "device": "cpu", "precision": "fp32",
             "seed": seed, "members": member, "run_name": f"{variant.replace('+', '-')}-{member}-s{seed}-{int(time.time())}",
             **BEFORE, **VARIANTS[variant]}
    summary, cfgs, _, steps, sps = train_for_minutes("multiply", "multiply-3digit", flags, minutes)
    m = summary.members[0]
    top = cfgs["data"].max_digits
    score = evaluate_members({m.name: m.model.eval()}, evaluation_dataset(cfgs["data"], top, top), "test",
                             test_n, seed=0)[m.name]
    return {"variant": variant, "member": member, "seed": seed, "minutes": minutes, "steps": steps,
            "seconds_per_step": sps, "train_seconds": m.train_seconds, "parameters": m.num_parameters,
            "exact_match": score["exact_match"], "ci": [score["ci_low"], score["ci_high"]], "n": score["n"],
            "digit_accuracy": score["digit_accuracy"], "options": VARIANTS[variant]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=4.0, help="minutes of training steps for every run")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--members", default="simple", choices=["simple", "latent"])
    ap.add_argument("--test-n", type=int, default=10000, help="held-out 3x3 test problems scored")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "multiply-options")
    args = ap.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    print_machine()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    done = json.loads(path.read_text()) if path.exists() else {"runs": []}
    done.setdefault("machine", cpu_summary())
    runs_dir = scratch_dir("multiply-options-")
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            key = (variant, args.members, seed, args.minutes)
            if any((r["variant"], r["member"], r["seed"], r["minutes"]) == key for r in done["runs"]):
                continue
            r = run_one(variant, args.members, seed, args.minutes, runs_dir, args.test_n)
            done["runs"].append(r)
            path.write_text(json.dumps(done, indent=1))
            print(f"{variant:24s} seed {seed}: {r['steps']} steps, 3x3 test exact-match {r['exact_match']:.2%} "
                  f"({r['ci'][0]:.2%}-{r['ci'][1]:.2%}), digits {r['digit_accuracy']:.2%}", flush=True)
    table(done, args.members, args.minutes, args.out)


def table(done: dict, member: str, minutes: float, out: Path) -> None:
    by: dict[str, list[dict]] = {}
    for r in done["runs"]:
        if r["member"] == member and r["minutes"] == minutes:
            by.setdefault(r["variant"], []).append(r)
    if "base" not in by:
        return
    ref = statistics.mean(r["exact_match"] for r in by["base"])
    lines = [f"`{member}` on multiply-3digit, {minutes:g} minute(s) of training steps per run, fp32; scored on "
             f"{by['base'][0]['n']:,} held-out 3x3 test problems; machine: {done['machine']}", "",
             "| variant | parameters | steps | 3x3 exact-match per seed (95% CI) | mean | vs base |",
             "|---|---|---|---|---|---|"]
    for name in VARIANTS:
        if name not in by:
            continue
        rs = sorted(by[name], key=lambda r: r["seed"])
        mean = statistics.mean(r["exact_match"] for r in rs)
        per = " / ".join(f"{r['exact_match']:.2%} ({r['ci'][0]:.1%}-{r['ci'][1]:.1%})" for r in rs)
        lines.append(f"| {name} | {rs[0]['parameters']:,} | {round(statistics.mean(r['steps'] for r in rs)):,} | "
                     f"{per} | {mean:.2%} | {100 * (mean - ref):+.2f} pts |")
    text = "\n".join(lines) + "\n"
    (out / f"table-{member}-{minutes:g}min.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
