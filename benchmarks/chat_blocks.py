"""What each piece of the modern block is worth, at equal wall time: every variant of the
model trains for the same minutes of training steps (its step count fitted from its own
measured step time, after warm-up), on tinyshakespeare, over seeds, and is scored by its
loss over the whole val span (not a few sampled batches).

    python benchmarks/chat_blocks.py                          # the variants below, 1 minute, seeds 0 and 1
    python benchmarks/chat_blocks.py --minutes 2 --seeds 0,1,2 --variants classic,llama
    python benchmarks/chat_blocks.py --base fast-cpu --out results/chat-blocks

The base recipe is a preset (fast-cpu: 2 layers of 128, Muon); each variant changes only
the model options named. fp32 on every side, so the figures mean the same on every CPU.
Each result is appended to ``OUT/results.json`` as it comes: the same command again
skips what is there, so an interrupted sweep continues where it stopped.
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

from common import print_machine, scratch_dir, span_loss, train_for_minutes  # noqa: E402

from trainlab.engine.precision import cpu_summary  # noqa: E402

# SwiGLU has three matrices where the others have two: 344 (~2/3 of 4 x 128, a multiple of
# 8) keeps its parameter count with the others'
SWIGLU = {"mlp": "swiglu", "dim_feedforward": 344}
LLAMA = {"positions": "rotary", "norm": "rmsnorm", **SWIGLU, "tie_weights": False, "zero_init": True}
VARIANTS = {
    "classic": {},
    "rotary": {"positions": "rotary"},
    "rmsnorm": {"norm": "rmsnorm"},
    "qk-norm": {"qk_norm": True},
    "relu2": {"mlp": "relu2"},
    "swiglu": SWIGLU,
    "untied": {"tie_weights": False},
    "zero-init": {"zero_init": True},
    "softcap": {"logit_softcap": 15.0},
    "llama": LLAMA,  # rotary, RMSNorm, SwiGLU, untied, zero-init: exports as LlamaForCausalLM
    "qwen3": {**LLAMA, "qk_norm": True},  # and QK-norm: Qwen3ForCausalLM
    "llama+relu2": {**LLAMA, "mlp": "relu2", "dim_feedforward": 0},
}


def run_one(base: str, variant: str, seed: int, minutes: float, runs_dir: str, text: str) -> dict:
    flags = {"text": text, "runs_dir": runs_dir, "tag": "benchmark", "progress": False, "device": "cpu",
             "precision": "fp32", "seed": seed, "sample_every": 0, "run_name": f"{variant.replace('+', '-')}-s{seed}-{int(time.time())}",
             **VARIANTS[variant]}
    summary, cfgs, task, steps, sps = train_for_minutes("chat", base, flags, minutes)
    m = summary.members[0]
    mc = cfgs["model"]
    val = span_loss(m.model, task.corpus, "val", mc.context_len)
    return {"variant": variant, "seed": seed, "minutes": minutes, "steps": steps, "seconds_per_step": sps,
            "train_seconds": m.train_seconds, "tokens_per_second": m.examples * mc.context_len / m.train_seconds,
            "parameters": m.num_parameters, "val_loss": val, "options": VARIANTS[variant]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="fast-cpu", help="the preset every variant starts from")
    ap.add_argument("--minutes", type=float, default=1.0, help="minutes of training steps for every run")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "chat-blocks")
    ap.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    args = ap.parse_args()
    print_machine()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    done = json.loads(path.read_text()) if path.exists() else {"runs": []}
    done.setdefault("machine", cpu_summary())
    runs_dir = scratch_dir("chat-blocks-")
    seeds = [int(s) for s in args.seeds.split(",")]
    for variant in args.variants.split(","):
        for seed in seeds:
            key = (args.base, variant, seed, args.minutes)
            if any((r.get("base"), r["variant"], r["seed"], r["minutes"]) == key for r in done["runs"]):
                continue
            r = {"base": args.base, **run_one(args.base, variant, seed, args.minutes, runs_dir, str(args.text))}
            done["runs"].append(r)
            path.write_text(json.dumps(done, indent=1))
            print(f"{variant:12s} seed {seed}: {r['steps']} steps, {r['tokens_per_second']:,.0f} tokens/s, "
                  f"val {r['val_loss']:.4f}", flush=True)
    table(done, args.base, args.minutes, args.out)


def table(done: dict, base: str, minutes: float, out: Path) -> None:
    rows = [r for r in done["runs"] if r.get("base") == base and r["minutes"] == minutes]
    by = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    if "classic" not in by:
        return
    ref_loss = statistics.mean(r["val_loss"] for r in by["classic"])
    ref_tps = statistics.mean(r["tokens_per_second"] for r in by["classic"])
    lines = [f"Base {base}, {minutes:g} minute(s) of training steps per run, fp32; machine: {done['machine']}", "",
             "| variant | parameters | steps | tokens/s vs classic | val loss (whole span), per seed | mean | "
             "vs classic |", "|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        if name not in by:
            continue
        rs = sorted(by[name], key=lambda r: r["seed"])
        mean = statistics.mean(r["val_loss"] for r in rs)
        tps = statistics.mean(r["tokens_per_second"] for r in rs)
        lines.append(f"| {name} | {rs[0]['parameters']:,} | {round(statistics.mean(r['steps'] for r in rs)):,} | "
                     f"{tps / ref_tps:.2f}x | {' / '.join(format(r['val_loss'], '.4f') for r in rs)} | {mean:.4f} | "
                     f"{mean - ref_loss:+.4f} |")
    text = "\n".join(lines) + "\n"
    (out / f"table-{base}-{minutes:g}min.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
