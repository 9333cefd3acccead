"""Where a tick of `chat serve`'s engine goes, in process (no HTTP): the shared decoding pass
against the rest (sampling, stops, events), for 1 and 8 rows decoding 300 characters each.

    python benchmarks/engine_tick.py --checkpoint bench --runs-dir /tmp/tl/sl-runs --rows 1,8

The rest is the engine's Python; after a pass has streamed the weights through every cache it
runs cold, several times slower than the same code warm (the last line measures that).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import torch
from common import add_model_args, model_run, print_machine
from serve_latency import PROMPT


def ticks(engine, vocab, rows: int, n: int = 200) -> tuple[float, float]:
    """(median tick, median pass) in seconds, ``rows`` streams decoding together."""
    from trainlab.chat.config import SamplingConfig
    from trainlab.chat.serve.engine import Job, Outbox

    loop = asyncio.new_event_loop()
    passes: list[float] = []
    decode = engine._decode

    def timed(*args):
        t = time.perf_counter()
        out = decode(*args)
        passes.append(time.perf_counter() - t)
        return out

    engine._decode = timed
    try:
        for r in range(rows):
            cfg = SamplingConfig(max_new_tokens=n + 10, stop_at="none")
            engine.rows[r] = Job(vocab.encode_known(PROMPT)[0].tolist(), cfg, [], loop, Outbox(),
                                 generator=torch.Generator().manual_seed(r))
        engine._tick()  # the prompts' passes
        passes.clear()
        took = []
        for _ in range(n):
            t = time.perf_counter()
            engine._tick()
            took.append(time.perf_counter() - t)
            loop.run_until_complete(asyncio.sleep(0))  # the events delivered, as the server's loop would
        return statistics.median(took), statistics.median(passes)
    finally:
        engine._decode = decode
        for r in range(rows):
            engine._free(r)
        loop.close()


def cold_python(repeats: int = 100) -> tuple[float, float]:
    """(warm, cold) seconds of one next_token call: back to back, and right after streaming
    57 MB (a 14M model's weights) through the caches."""
    from trainlab.chat.config import SamplingConfig
    from trainlab.chat.sampling import next_token

    cfg, g = SamplingConfig(), torch.Generator().manual_seed(0)
    x, big = torch.randn(65), torch.randn(57 * 2**20 // 4)
    buf = torch.empty_like(big)
    recent = list(range(40))
    warm, cold = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        next_token(x, torch.tensor(recent), cfg, g)
        warm.append(time.perf_counter() - t)
        buf.copy_(big)
        t = time.perf_counter()
        next_token(x, torch.tensor(recent), cfg, g)
        cold.append(time.perf_counter() - t)
    return statistics.median(warm), statistics.median(cold)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print_machine()
    from trainlab.chat.loading import load_chat_model
    from trainlab.chat.serve.engine import Engine, Limits
    from trainlab.engine.tracking import resolve_checkpoint

    runs, args.checkpoint = model_run(args, "tick-bench-")
    cm = load_chat_model(resolve_checkpoint(runs, "chat", args.checkpoint), torch.device("cpu"))
    engine = Engine(cm, Limits(), own_thread=False, kernels_root=Path(runs) / ".compiled")
    print(f"warm-up {engine.warm_up():.1f} s; " + "; ".join(engine.notes), flush=True)
    for rnd in range(args.rounds):
        for rows in (int(r) for r in args.rows.split(",")):
            tick, one = ticks(engine, cm.vocab, rows)
            print(f"round {rnd + 1}, {rows} rows: a tick {1e3 * tick:.2f} ms, its pass {1e3 * one:.2f} ms, the rest "
                  f"{1e3 * (tick - one):.2f} ms ({1e6 * (tick - one) / rows:.0f} us a row)", flush=True)
    warm, cold = cold_python()
    print(f"next_token, warm: {1e6 * warm:.0f} us; right after streaming 57 MB through the caches: {1e6 * cold:.0f} us")


if __name__ == "__main__":
    main()
