"""ChatGoT on tinyshakespeare: val loss by step, throughput, wall time, samples.

Targets (issue 4):

    # nanoGPT's published CPU figure: val loss 1.88 at 2000 iterations, same configuration
    python benchmarks/chat_convergence.py --preset nanogpt-cpu
    # the 14M model for 20 minutes of training here; samples should read as play-format English
    python benchmarks/chat_convergence.py --preset chatgot-14m --minutes 20 --batch-size 8 --lr 0.0015 \
        --dropout 0 --warmup-steps 50 --eval-batches 8

Any `trainlab chat train` flag passes through. ``--minutes`` is trainlab's own time budget
(engine/budget.py), counted from this script's launch to the run's report: the step count
(and so the end of the LR schedule) is fitted from the run's measured pace, evaluations
included. The corpus is read from
``../shared/data/tinyshakespeare.txt`` unless --text says otherwise; runs go to a
temporary folder unless --runs-dir says otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from common import print_machine, scratch_dir, span_loss  # noqa: E402

from trainlab import runs  # noqa: E402
from trainlab.chat.config import SamplingConfig
from trainlab.chat.sampling import generate  # noqa: E402
from trainlab.chat.task import make_chat_task  # noqa: E402
from trainlab.cli import build_parser  # noqa: E402
from trainlab.cli.common import flags_of  # noqa: E402
from trainlab.config import build  # noqa: E402
from trainlab.engine.budget import process_age  # noqa: E402
from trainlab.engine.loop import train  # noqa: E402
from trainlab.engine.tracking import new_run  # noqa: E402

NANOGPT_VAL_LOSS = 1.88  # nanoGPT README, shakespeare_char on CPU, 2000 iterations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, help="a time budget from this script's launch to the report "
                                                  "(trainlab's --minutes); replaces --max-steps")
    ap.add_argument("--samples", type=int, default=3, help="samples printed at the end")
    ap.add_argument("--sample-chars", type=int, default=300)
    known, rest = ap.parse_known_args()
    print_machine()
    if "--text" not in rest:
        rest = ["--text", str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"), *rest]
    if "--runs-dir" not in rest:
        rest = ["--runs-dir", scratch_dir("chat-bench-"), *rest]
    args = build_parser().parse_args(["chat", "train", "--no-progress", "--tag", "benchmark", *rest])
    values = runs.settings("chat", args.preset, args.config, flags_of(args))  # default preset: chatgot-14m
    cfgs = {name: build(cls, values) for name, cls in runs.chat_sections()}
    task = make_chat_task(cfgs)
    if known.minutes:  # the engine's own budget: launch to report in that many minutes (engine/budget.py)
        # evaluations as often as the budget's share for them allows (engine/budget.py: SHARES)
        cfgs["train"] = replace(cfgs["train"], minutes=known.minutes, max_steps=None, lr_decay_steps=None,
                                eval_every=1, sample_every=0)
    corpus = task.corpus
    config = {name: asdict(c) for name, c in cfgs.items()}
    tc, mc = cfgs["train"], cfgs["model"]
    run = new_run(tc.runs_dir, task.name, tc.run_name, tc.tag, config)
    print(f"run {run.dir}; torch threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    summary = train(task, tc, run, config, started=time.monotonic() - process_age())
    wall = time.perf_counter() - t0
    m = summary.members[0]

    tokens = m.examples * mc.context_len
    print(f"\n{m.num_parameters:,} parameters; d_model {mc.d_model}, {mc.num_layers} layers, {mc.nhead} heads, "
          f"context {mc.context_len}, batch {tc.batch_size}; val loss over {cfgs['task'].eval_batches} fixed "
          f"batches of val windows")
    print(f"{'step':>6} {'train min':>9} {'val loss':>9} {'train loss':>10}")
    per_step = m.train_seconds / max(1, m.step) / 60
    for e in m.evals:
        print(f"{int(e['step']):>6} {e['step'] * per_step:>9.1f} {e['val_loss']:>9.4f} {e['train_loss']:>10.4f}")
    final = m.evals[-1]["val_loss"]
    n_val = (len(corpus.val) - 1) // mc.context_len
    print(f"\nfinal val loss {final:.4f} (perplexity {math.exp(final):.2f}) at step {m.step}; over the whole "
          f"val span {span_loss(m.model, corpus, 'val', mc.context_len):.4f}; over as many windows from the "
          f"start of train {span_loss(m.model, corpus, 'train', mc.context_len, n_val):.4f}")
    print(f"throughput {tokens / m.train_seconds:,.0f} tokens/s over {m.train_seconds / 60:.1f} min of training "
          f"steps; wall time {wall / 60:.1f} min including evaluation, sampling and checkpoints")
    if tc.max_steps == 2000 and mc.context_len == 64 and mc.d_model == 128:
        verdict = "met" if final <= NANOGPT_VAL_LOSS else "NOT met"
        print(f"target: val loss <= {NANOGPT_VAL_LOSS} at 2000 iterations (nanoGPT's figure): {verdict}")
    cfg = SamplingConfig(temperature=0.8, max_new_tokens=known.sample_chars)
    vocab = corpus.vocab
    for i in range(known.samples):
        g = torch.Generator().manual_seed(i)
        text = "".join(generate(m.model, vocab.encode("\n").tolist(), cfg, lambda t: vocab.chars[t], g))
        print(f"\n--- sample {i + 1} (temperature 0.8, seed {i}) ---\n{text}")


if __name__ == "__main__":
    main()
