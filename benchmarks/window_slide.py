"""What a full cache costs in quality: rebuilt from its recent part, or slid (issue 37).

When a stream passes the context, `generate` and the server used to rebuild the cache from
its last three quarters with a whole prompt pass (three positions of work for every new
character); a rotary model can instead slide it (`decoding.slide_cache`: the oldest quarter
dropped, the kept keys turned back by as many positions, nothing recomputed). The two feed
the model different numbers: after a rebuild, the kept positions were computed with only the
kept text before them, as in training; after a slide, with all the text they had. This
measures which predicts the text better, teacher-forced, character by character, over the
val span of the corpus the model trained on (the last `val_fraction` of it), beside the
ideal: every character predicted from a fresh pass over the `context_len` characters
before it (as in training, each window's last position).

    python benchmarks/window_slide.py --checkpoint RUN --runs-dir runs [--chars 4000]

Prints the mean loss (nats a character) of each rule over the characters past the first
window (where the rules differ), a paired interval of the difference, and the time each
rule's decoding took.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from common import print_machine

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def losses(model, tokens: list[int], rule: str) -> tuple[list[float], float]:
    """Each character's loss (nats) from position 1 on, decoding under ``rule``: rebuild,
    slide, or fresh (a whole window's pass for every character); and the seconds it took."""
    from trainlab.chat.decoding import Decoder, RowCache

    ctx = model.cfg.context_len
    keep = max(1, ctx - ctx // 4)
    out: list[float] = []
    t0 = time.perf_counter()
    if rule == "fresh":
        for i in range(1, len(tokens)):
            window = tokens[max(0, i - ctx):i]  # the ctx characters before i: a training window's last position
            logits, _ = model(torch.tensor([window]))
            out.append(float(torch.nn.functional.cross_entropy(logits[0, -1:], torch.tensor([tokens[i]]))))
        return out, time.perf_counter() - t0
    decoder = Decoder(model, compiled=False)
    cache = RowCache(model)
    logits = cache.fill(model, tokens[:1])
    for i in range(1, len(tokens)):
        out.append(float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([tokens[i]]))))
        if i == len(tokens) - 1:
            break
        if cache.length >= ctx and rule == "rebuild":
            logits = cache.fill(model, tokens[i + 1 - keep:i + 1])
        else:
            if cache.length >= ctx:
                cache.slide(model, ctx - keep)
            logits = cache.step(decoder, tokens[i])
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a chat run (rotary positions)")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
                    help="the corpus the model trained on")
    ap.add_argument("--chars", type=int, default=4000, help="characters of the val span to decode")
    args = ap.parse_args()
    print_machine()
    from trainlab.chat.data import TextCorpus
    from trainlab.chat.decoding import slides
    from trainlab.chat.loading import load_chat_model
    from trainlab.engine.tracking import resolve_checkpoint

    ckpt = resolve_checkpoint(args.runs_dir, "chat", args.checkpoint)
    cm = load_chat_model(ckpt, torch.device("cpu"))
    model = cm.model.eval()
    if not slides(model):
        sys.exit(f"error: {args.checkpoint} has {model.cfg.positions} positions, which do not slide")
    from trainlab.config import flat_settings

    settings = flat_settings(ckpt.json("config.json")) if "config.json" in ckpt.sums else {}
    corpus = TextCorpus.from_text(args.text.read_text(encoding="utf-8"), float(settings.get("val_fraction", 0.1)),
                                  cm.vocab)
    tokens = [int(t) for t in corpus.tokens[corpus.split_at:corpus.split_at + args.chars]]
    ctx = model.cfg.context_len
    print(f"model {args.checkpoint}: {sum(p.numel() for p in model.parameters()):,} parameters, context {ctx}; "
          f"{len(tokens):,} val characters, scored past the first window ({len(tokens) - ctx:,})")
    got = {}
    for rule in ("fresh", "rebuild", "slide"):
        per, secs = losses(model, tokens, rule)
        got[rule] = per[ctx - 1:]  # predictions of positions ctx.. (the first window is the same under all)
        print(f"  {rule:8s} loss {sum(got[rule]) / len(got[rule]):.4f}  ({secs:.1f} s to decode)")
    for a, b in (("slide", "rebuild"), ("slide", "fresh"), ("rebuild", "fresh")):
        d = [x - y for x, y in zip(got[a], got[b])]
        mean = sum(d) / len(d)
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
        half = 1.96 * sd / math.sqrt(len(d))
        print(f"  {a} - {b}: {mean:+.4f} nats a character (95% CI {mean - half:+.4f} to {mean + half:+.4f})")


if __name__ == "__main__":
    main()
