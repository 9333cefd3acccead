"""`trainlab chat serve` through HTTP with the official client: time to first character,
characters/s of one stream, of 8 at once, and of one beside a training job; against
`chat generate` on the same model (what the server costs over the bare loop).

    python benchmarks/serve_latency.py                    # trains a chatgot-14m for 1 step to serve
    python benchmarks/serve_latency.py --checkpoint RUN --runs-dir runs

The model's quality does not change its speed, so an untrained 14M model serves as well
as a trained one. Targets (issue 20): first character <= 50 ms for a 200-character
prompt; >= 200 characters/s for one stream; 8 streams at >= 40 each; one stream >= 50
beside a training job. Each figure is the median of ``--rounds`` tries.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import decoding_floor, print_machine, untrained_14m

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ("KING RICHARD III:\nNow is the winter of our discontent\nMade glorious summer by this sun of York;\n"
          "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n")[:200]


def trainlab(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainlab", *args], **kw)


def wait_up(url: str, timeout: float = 120) -> None:
    import httpx

    t = time.monotonic()
    while time.monotonic() - t < timeout:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:  # warmed up
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("the server did not come up")


async def one_stream(url: str, chars: int, seed: int) -> tuple[float, float, int]:
    """(seconds to the first character, characters/s after it, characters) of one streamed completion."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    t0 = time.perf_counter()
    first, n = None, 0
    stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=chars, seed=seed, stream=True,
                                             extra_body={"stop_at": "none"})
    async for chunk in stream:
        piece = chunk.choices[0].text
        if piece and first is None:
            first = time.perf_counter()
        n += len(piece)
    end = time.perf_counter()
    await client.close()
    return first - t0, (n - 1) / max(1e-9, end - first), n


def run_streams(url: str, k: int, chars: int) -> list[tuple[float, float, int]]:
    async def go():
        return await asyncio.gather(*(one_stream(url, chars, seed) for seed in range(k)))
    return asyncio.run(go())


MODEL = "?"


def bare_loop(runs: str, checkpoint: str, chars: int, weights: str = "fp32") -> tuple[float, float]:
    """(seconds to the first character, characters/s after it) of `chat generate`'s own loop."""
    from dataclasses import replace

    import torch

    from trainlab.chat.config import SamplingConfig
    from trainlab.chat.repl import complete, load_chat_model, with_weights
    from trainlab.chat.sampling import make_generator
    from trainlab.engine.threads import ThreadTuner
    from trainlab.engine.tracking import resolve_checkpoint

    cm = load_chat_model(resolve_checkpoint(runs, "chat", checkpoint), torch.device("cpu"))
    cm = replace(cm, model=with_weights(cm.model, weights, torch.device("cpu"), print))
    ids = cm.vocab.encode_known(PROMPT)[0].tolist()
    cfg = SamplingConfig(max_new_tokens=chars, stop_at="none")
    tuner = ThreadTuner()
    "".join(complete(cm, ids, SamplingConfig(max_new_tokens=50), make_generator(0), tuner))  # warm-up
    t0 = time.perf_counter()
    first, n = None, 0
    for piece in complete(cm, ids, cfg, make_generator(0), tuner):
        if first is None:
            first = time.perf_counter()
        n += len(piece)
    return first - t0, (n - 1) / (time.perf_counter() - first)


def measure(url: str, runs: str, args, weights: str) -> dict[str, tuple[float, float]]:
    rows = {}
    run_streams(url, 1, 50)  # warm-up of the client side
    for name, k in (("1 stream", 1), ("8 streams", 8)):
        tries = [run_streams(url, k, args.chars) for _ in range(args.rounds)]
        ttfc = statistics.median(max(t for t, _, _ in r) for r in tries)  # the slowest stream's first character
        rate = statistics.median(min(c for _, c, _ in r) for r in tries)  # the slowest stream of each try
        rows[name] = (ttfc, rate)
    trainer = trainlab("chat", "train", "--text", str(args.text), "--runs-dir", runs, "--preset", "nanogpt-cpu",
                       "--max-steps", "100000", "--run-name", f"beside-{weights}", "--no-progress", "--precision",
                       "fp32", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(15)  # the training job is stepping
        tries = [run_streams(url, 1, args.chars) for _ in range(args.rounds)]
        rows["1 stream beside training"] = (statistics.median(t for r in tries for t, _, _ in r),
                                            statistics.median(r[0][1] for r in tries))
    finally:
        trainer.terminate()
        trainer.wait()
    return rows


def main() -> None:
    global MODEL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a chat run to serve (default: a chatgot-14m trained for one step)")
    ap.add_argument("--runs-dir", default=None)
    ap.add_argument("--chars", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--weights", default="fp32,bf16", help="the --weights of each server measured, in turn")
    ap.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    args = ap.parse_args()
    print_machine()
    runs = args.runs_dir or tempfile.mkdtemp(prefix="serve-bench-")
    if args.checkpoint is None:
        args.checkpoint = untrained_14m(runs, args.text)
    MODEL = Path(args.checkpoint).name
    url = f"http://127.0.0.1:{args.port}"
    results = {}
    for weights in args.weights.split(","):
        server = trainlab("chat", "serve", "--checkpoint", args.checkpoint, "--runs-dir", runs, "--port",
                          str(args.port), "--device", "cpu", "--weights", weights, "--quiet",
                          stdout=subprocess.PIPE, text=True)
        try:
            wait_up(url)
            results[weights] = measure(url, runs, args, weights)
        finally:
            server.terminate()
            out = server.communicate()[0]
        print(f"server ({weights}): " + " | ".join(line for line in out.splitlines() if line.startswith(("ready", "note"))))
        results[weights]["chat generate (no server)"] = bare_loop(runs, args.checkpoint, args.chars, weights)
    print(f"\n14M model ({args.checkpoint}), prompt {len(PROMPT)} characters, {args.chars} characters a stream, "
          f"median of {args.rounds} tries; through HTTP with the openai client")
    targets = {"1 stream": (0.050, 250), "8 streams": (0.150, 150), "1 stream beside training": (None, 100),
               "chat generate (no server)": (None, 300)}
    for weights, rows in results.items():
        print(f"  --weights {weights}")
        for name, (ttfc, rate) in rows.items():
            t_ttfc, t_rate = targets[name]
            print(f"    {name:26s} first character {1000 * ttfc:6.1f} ms"
                  f"{'' if t_ttfc is None else f' (target <= {1000 * t_ttfc:.0f})':15s}"
                  f" {rate:6.0f} characters/s each (target >= {t_rate})")
    import torch

    from trainlab.chat.repl import load_chat_model
    from trainlab.engine.tracking import resolve_checkpoint

    cm = load_chat_model(resolve_checkpoint(runs, "chat", args.checkpoint), torch.device("cpu"))
    print("  " + decoding_floor(cm.model) + " (bf16 weights: half the bytes)")


if __name__ == "__main__":
    main()
