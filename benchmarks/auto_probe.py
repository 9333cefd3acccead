"""How long ``--preset auto`` spends timing recipes before it chooses, with and without timing
the larger recipes in bf16 alone once bf16 has beaten fp32 on a smaller one (``auto.py``).

    PYTHONPATH=src python benchmarks/auto_probe.py --minutes 1,5,20 --rounds 2 --out results/auto/probe.json

Each round runs ``auto.choose`` both ways, alternated (these machines are shared and noisy), in
this process, on tinyshakespeare: the seconds to the choice, the recipe chosen and the
precision of every recipe timed. "both" times every larger recipe in fp32 and bf16, as auto
did before. On a CPU where ``--precision auto`` offers only fp32 the two are the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import TINYSHAKESPEARE, print_machine

from trainlab import auto
from trainlab.engine import step
from trainlab.engine.precision import cpu_summary


def choose(minutes: float, text: Path, narrow: bool) -> dict:
    engine_fitted = step.fitted_seconds_per_step

    def both(task, cfg, device=None, n=10, warmup=5, known=None):
        return engine_fitted(task, cfg, device, n, warmup)  # every candidate, whatever auto knows

    if not narrow:
        step.fitted_seconds_per_step = both
    try:
        started = time.monotonic()
        name, record = auto.choose("chat", None, {"text": str(text), "minutes": minutes}, started,
                                   echo=lambda line: None)
        seconds = time.monotonic() - started
    finally:
        step.fitted_seconds_per_step = engine_fitted
    return {"minutes": minutes, "way": "bf16 alone once it wins" if narrow else "both",
            "seconds": round(seconds, 2), "chose": name,
            "probes": [(p["preset"], p["precision"]) for p in record["auto"]["probes"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", default="1,5,20")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--text", default=str(TINYSHAKESPEARE))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    print_machine()
    rows = []
    for minutes in (float(m) for m in args.minutes.split(",")):
        for r in range(args.rounds):
            for narrow in ((True, False) if r % 2 == 0 else (False, True)):
                row = choose(minutes, Path(args.text), narrow)
                rows.append(row)
                print(f"{minutes:g} min, {row['way']}: chose {row['chose']} in {row['seconds']:.1f} s", flush=True)
        for way in ("bf16 alone once it wins", "both"):
            s = [row["seconds"] for row in rows if row["minutes"] == minutes and row["way"] == way]
            print(f"{minutes:g} min, {way}: median {statistics.median(s):.1f} s to choose over {len(s)} rounds")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": cpu_summary(), "date": time.strftime("%Y-%m-%d"), "rows": rows},
                              indent=1) + "\n")


if __name__ == "__main__":
    main()
