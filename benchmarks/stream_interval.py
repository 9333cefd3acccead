"""What `chat serve --stream-interval-ms` buys: the same streams served with each interval in
turn, alternating, through HTTP with the official client on the same machine (as in
`serve_latency.py`; what one event costs alone: `http_event_cost.py`).

    python benchmarks/stream_interval.py --checkpoint bench --runs-dir /tmp/tl/sl-runs --intervals 0,20

For each interval: characters/s of the slowest of 8 streams at once and of 1 stream, events a
stream received, and the first character's time, with the floor (the weights' bytes over the
rate this machine reads that many bytes again and again, one pass a character).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import serve_latency
from common import add_model_args, memory_bandwidth, model_run, print_machine
from serve_latency import PROMPT, run_streams, trainlab, wait_up, weight_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, "a chat run to serve (default: a chatgot-14m trained for one step)")
    ap.add_argument("--chars", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--intervals", default="0,20", help="the --stream-interval-ms values served, in turn")
    ap.add_argument("--port", type=int, default=8766)
    args = ap.parse_args()
    print_machine()
    runs, args.checkpoint = model_run(args, "serve-bench-")
    nbytes = weight_bytes(runs, args.checkpoint)
    bandwidth = memory_bandwidth(nbytes)  # first, on the idle machine
    model = serve_latency.MODEL = Path(args.checkpoint).name
    url = f"http://127.0.0.1:{args.port}"
    intervals = [float(x) for x in args.intervals.split(",")]
    got: dict[float, dict[str, list]] = {ms: {"8 streams": [], "1 stream": []} for ms in intervals}
    for rnd in range(args.rounds):
        for ms in intervals if rnd % 2 == 0 else intervals[::-1]:
            server = trainlab("chat", "serve", "--checkpoint", args.checkpoint, "--runs-dir", runs, "--port",
                              str(args.port), "--device", "cpu", "--quiet", "--stream-interval-ms", str(ms),
                              stdout=subprocess.DEVNULL)
            try:
                wait_up(url)
                run_streams(url, 1, 50)  # warm-up of the client side
                for name, k in (("8 streams", 8), ("1 stream", 1)):
                    r = run_streams(url, k, args.chars)
                    start = max(s.pieces[0][0] for s in r)  # every stream decoding from here on
                    got[ms][name].append((max(s.first for s in r), min(s.rate() for s in r),
                                          statistics.mean(len(s.pieces) for s in r), min(s.rate(start) for s in r)))
                    print(f"round {rnd + 1}, interval {ms:g} ms, {name}: slowest {got[ms][name][-1][1]:.0f} "
                          f"characters/s, {got[ms][name][-1][2]:.0f} events a stream", flush=True)
            finally:
                server.terminate()
                server.wait()
    floor = bandwidth / nbytes  # characters/s
    print(f"\n{model}, fp32, prompt {len(PROMPT)} characters, {args.chars} characters a stream, median of "
          f"{args.rounds} alternating rounds; floor {floor:.0f} characters/s ({bandwidth / 1e9:.1f} GB/s)")
    for ms in intervals:
        for name, tries in got[ms].items():
            ttfc, rate, events, steady = (statistics.median(t[i] for t in tries) for i in range(4))
            print(f"  interval {ms:4g} ms  {name:10s} {rate:6.0f} characters/s each, {rate / floor:.2f} of the floor "
                  f"({steady / floor:.2f} once all decode); {events:4.0f} events a stream; first character "
                  f"{1000 * ttfc:6.1f} ms")


if __name__ == "__main__":
    sys.exit(main())
