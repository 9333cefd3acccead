"""Greedy decoding of an exported 14M model: transformers' ``model.generate`` (its key/value
cache, greedy) against trainlab's own loop (what ``trainlab chat generate`` runs) with the
plain and the compiled pass (``--decode plain|compiled``), on the same checkpoint, prompt
and length, one after the other in alternating rounds, in characters per second over the
whole call (the prompt's pass included), and as a fraction of the floor (the weights' bytes
over the rate this machine reads that many bytes again and again, one pass a character). Target (issue 37): compiled
trainlab >= 1.5x transformers and >= 0.5 of the floor.

    python benchmarks/export_decode.py                  # a chatgot-14m trained for one step
    python benchmarks/export_decode.py --checkpoint RUN --runs-dir runs

Both run fp32 on the CPU with this process's threads. The model's quality does not change its
speed, so an untrained model serves as well as a trained one. transformers is the peer here
because it is what a user of the exported folder would otherwise run it with.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from common import add_model_args, decoding_floor, memory_bandwidth, model_run, print_machine, scratch_dir

PROMPT = "KING RICHARD III:\nNow is the winter of our discontent\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--chars", type=int, default=200, help="characters to generate (prompt + chars <= context)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    from trainlab.chat.config import SamplingConfig
    from trainlab.chat.decoding import Decoder
    from trainlab.chat.export import export
    from trainlab.chat.loading import load_chat_model
    from trainlab.chat.repl import complete
    from trainlab.chat.sampling import make_generator
    from trainlab.engine.threads import ThreadTuner
    from trainlab.engine.tracking import resolve_checkpoint

    print_machine()
    runs, args.checkpoint = model_run(args, "export-bench-")
    ckpt = resolve_checkpoint(runs, "chat", args.checkpoint)
    folder = Path(scratch_dir("export-bench-hf-")) / "model"
    export(ckpt, folder)
    cm = load_chat_model(ckpt, torch.device("cpu"))
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = cm.vocab.encode_known(PROMPT)[0].tolist()
    if len(ids) + args.chars > cm.model.cfg.context_len:
        raise SystemExit(f"--chars: the prompt ({len(ids)}) and {args.chars} characters exceed the context "
                         f"({cm.model.cfg.context_len}), which transformers' GPT-2 cannot slide past")
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=args.chars)
    tuner = ThreadTuner()
    compiled = Decoder(cm.model, compiled=True, cache_root=Path(runs) / ".compiled")
    print(compiled.prepare(), flush=True)
    rows = Decoder(cm.model, compiled=True, cache_root=Path(runs) / ".compiled", kernels=True)
    print(rows.prepare(), flush=True)

    # characters over the whole call, the prompt's pass included, on both sides (trainlab's loop
    # holds back trailing spaces, so the time between its pieces is not the time per character)
    def plain() -> tuple[float, str]:
        t0 = time.perf_counter()
        text = "".join(complete(cm, ids, cfg, make_generator(0), tuner))
        return len(text) / (time.perf_counter() - t0), text

    def ours() -> tuple[float, str]:  # a compiled pass is specialised to its thread count: not tuned
        t0 = time.perf_counter()
        text = "".join(complete(cm, ids, cfg, make_generator(0), None, compiled))
        return len(text) / (time.perf_counter() - t0), text

    def kernels() -> tuple[float, str]:  # the row kernels follow the thread count: tuned
        t0 = time.perf_counter()
        text = "".join(complete(cm, ids, cfg, make_generator(0), tuner, rows))
        return len(text) / (time.perf_counter() - t0), text

    def theirs() -> tuple[float, str]:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=args.chars, do_sample=False)
        new = out[0, len(ids):].tolist()
        return len(new) / (time.perf_counter() - t0), "".join(cm.vocab.chars[i] for i in new)

    plain(), ours(), kernels(), theirs()  # warm-up: first calls build kernels
    rates: dict[str, list[float]] = {"plain": [], "trainlab": [], "kernels": [], "transformers": []}
    texts = {}
    for _ in range(args.rounds):
        for name, fn in (("plain", plain), ("trainlab", ours), ("kernels", kernels), ("transformers", theirs)):
            rate, texts[name] = fn()
            rates[name].append(rate)
    med = {k: statistics.median(v) for k, v in rates.items()}
    weights = sum(p.numel() * p.element_size() for p in cm.model.parameters())
    floor = memory_bandwidth(weights) / weights  # characters/s at one read of the weights a character
    print(f"\n14M model ({args.checkpoint}), greedy, prompt {len(ids)} characters, {args.chars} characters, "
          f"median of {args.rounds} alternating rounds, {torch.get_num_threads()} threads")
    for name, label in (("plain", "trainlab, --decode plain"), ("trainlab", "trainlab, --decode compiled"),
                        ("kernels", "trainlab, --decode kernels"), ("transformers", "transformers model.generate")):
        print(f"  {label:32s} {med[name]:7.0f} characters/s ({med[name] / floor:.2f} of the floor)")
    print(f"  ratio compiled / transformers   {med['trainlab'] / med['transformers']:7.2f}x (target >= 1.5)")
    print(f"  ratio kernels / transformers    {med['kernels'] / med['transformers']:7.2f}x")
    print(f"  ratio plain / transformers      {med['plain'] / med['transformers']:7.2f}x")
    same = {k: texts[k] == texts["transformers"] for k in ("trainlab", "kernels", "plain")}
    print(f"  same text as transformers: compiled {same['trainlab']}, kernels {same['kernels']}, plain {same['plain']}")
    print("  " + decoding_floor(cm.model))


if __name__ == "__main__":
    main()
