"""Where in its window a chat model's val loss comes from: the loss over the whole val span
(the report's figure: every non-overlapping window of the model's context) split by the
position of the predicted character in its window.

    python benchmarks/position_loss.py RUN [--runs-dir runs] [--text corpus.txt]

The first characters of a window are predicted from almost nothing, so they cost far more
than the rest; their share of the span's mean is 1 / context. A longer context lowers the
whole-span figure for that reason alone, besides whatever the model makes of the longer past:
this prints both parts, so a recipe with another context can be read fairly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainlab.chat.data import TextCorpus  # noqa: E402
from trainlab.chat.loading import load_chat_model  # noqa: E402
from trainlab.engine.checkpoint import latest_checkpoint  # noqa: E402
from trainlab.engine.tracking import find_run  # noqa: E402


@torch.no_grad()
def loss_by_position(model: torch.nn.Module, corpus: TextCorpus, ctx: int) -> torch.Tensor:
    """(ctx,) mean loss of the val span's non-overlapping windows at each position."""
    starts = np.arange(0, len(corpus.val) - ctx, ctx)
    total = torch.zeros(ctx, dtype=torch.float64)
    for i in range(0, len(starts), 128):
        b = corpus.windows("val", starts[i:i + 128], ctx)
        logits, _ = model(b["x"])  # (B, ctx, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), b["y"].flatten(), reduction="none")  # (B * ctx,)
        total += loss.view(-1, ctx).sum(0).double()
    return total / len(starts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a chat run id or folder")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--text", help="the corpus it trained on (default: the path its run recorded)")
    args = ap.parse_args()
    folder = find_run(args.runs_dir, "chat", args.run).dir
    ckpt = latest_checkpoint(folder / "checkpoints")
    if ckpt is None:
        raise SystemExit(f"position_loss: {folder} has no checkpoint")
    chat = load_chat_model(ckpt, torch.device("cpu"))
    ctx = chat.model.cfg.context_len
    data = ckpt.json("config.json").get("data", {})
    text_path = args.text or data.get("text")
    if not text_path:
        raise SystemExit("position_loss: give --text (the run does not record its corpus)")
    corpus = TextCorpus.from_text(Path(text_path).read_text(encoding="utf-8"), float(data.get("val_fraction", 0.1)),
                                  chat.vocab)
    per = loss_by_position(chat.model, corpus, ctx)
    print(f"{folder.name}: context {ctx}, loss over the whole val span {per.mean():.4f}")
    edges = [0, 8, 16, 32, 64, 128, 256, 512, 1024]
    bands = [(a, min(b, ctx)) for a, b in zip(edges, edges[1:]) if a < ctx]
    for a, b in bands:
        print(f"  positions {a:4d}-{b - 1:4d}: {per[a:b].mean():.4f}")
    late = per[ctx // 2:].mean()
    print(f"  the window's second half: {late:.4f}; the span's mean is {per.mean() - late:+.4f} from it, "
          f"mostly from the first positions")


if __name__ == "__main__":
    main()
