"""How well ``--minutes M`` holds: wall time from launch to exit, timed from outside the process.

For each budget and task it runs the real command in a fresh process, as a user would:

    trainlab chat train --preset chat-1min --text tinyshakespeare.txt --minutes M
    trainlab multiply train --preset multiply-3digit --members simple --minutes M

(multiply-3digit's 300 warm-up steps alone take about a minute on 2 cores: under 2 minutes the
benchmark passes ``--warmup-steps 30``; without it the run is refused in one line naming the
least budget that fits) and prints, per run: the wall time against M (target: within 3%), the steps the budget
fitted (and whether the check refitted them), the share of the wall time spent in training
steps (target: at least 85%), where the LR schedule stood at the last step (1.0 its peak,
the preset's final ratio its end: the run must end decayed), and the task's final figure
(chat: the loss over the whole val span; multiply: 3x3 test exact-match when the run trains
3 digits). Results go to ``--out`` (JSON, one object per run), written after each run, and
a rerun with the same ``--out`` skips the runs already there.

    python benchmarks/minutes_accuracy.py --minutes 1,1,1,5 --tasks chat,multiply --out results/minutes/avx512.json
    python benchmarks/minutes_accuracy.py --minutes 20 --tasks chat --chat-preset chat-20min --out results/minutes/avx512.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import print_machine, scratch_dir  # noqa: E402

from trainlab.engine.precision import cpu_summary  # noqa: E402

COMMANDS = {
    "chat": ["chat", "train", "--preset", "chat-1min"],
    "multiply": ["multiply", "train", "--preset", "multiply-3digit", "--members", "simple"],
}


def one_run(task: str, minutes: float, runs_dir: str, text: str, extra: list[str], preset: str | None = None) -> dict:
    name = f"{task}-{minutes:g}-{time.strftime('%H%M%S')}"
    cmd = [sys.executable, "-m", "trainlab", *COMMANDS[task], "--minutes", f"{minutes:g}", "--runs-dir", runs_dir,
           "--run-name", name, "--no-progress", "--tag", "benchmark", *extra]
    if task == "chat":
        cmd += ["--text", text]
        if preset:
            cmd[cmd.index("chat-1min")] = preset
    if task == "multiply" and minutes < 2:  # the preset's 300 warm-up steps alone take about a minute here
        cmd += ["--warmup-steps", "30"]
    t = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t
    if out.returncode != 0:
        raise SystemExit(f"{task} {minutes}: exit {out.returncode}: {out.stderr.strip()[-500:]}")
    folder = Path(runs_dir) / ("chat" if task == "chat" else "parallel_comparison") / name
    info = json.loads((folder / "run.json").read_text())
    b = info["budget"]
    report = (folder / "report.md").read_text()
    figure = None
    if task == "chat":
        m = re.search(r"whole val span: \*\*([\d.]+)\*\*", report)
        figure = {"val_span_loss": float(m.group(1))} if m else None
    else:
        m = re.search(r"\| test exact-match \(95% CI\) \| ([\d.]+)%", report)
        figure = {"test_exact_match": float(m.group(1)) / 100} if m else None
    precision = sorted(set(re.findall(r"--precision auto: (\w+)", out.stdout))) or \
        sorted(set(re.findall(r"parameters, precision (\w+)", out.stdout)))
    return {"task": task, "minutes": minutes, "wall_seconds": round(wall, 2), "error": round(wall / (60 * minutes) - 1, 4),
            "steps": b["steps"], "fits": [(f["kind"], f["at_step"], f.get("steps")) for f in b["fits"]],
            "train_share": round(b["train_seconds"] / wall, 4), "last_lr_factor": b["last_lr_factor"],
            "min_lr_ratio": info["config"]["train"]["min_lr_ratio"], "inside": b.get("wall_seconds"),
            "precision": "/".join(precision), "figure": figure, "command": " ".join(cmd[1:]),
            "auto": (info.get("auto") or {}).get("preset"),
            "machine": cpu_summary(), "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", default="1,1,1,5,20", help="budgets, comma-separated")
    ap.add_argument("--tasks", default="chat,multiply")
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--chat-preset", help="the chat recipe (default chat-1min; chat-20min for 20 minutes, say)")
    ap.add_argument("--out", help="JSON file of the results (resumable: runs already in it are skipped)")
    ap.add_argument("--runs-dir", help="default: a temporary folder")
    known, extra = ap.parse_known_args()
    print_machine()
    runs_dir = known.runs_dir or scratch_dir("minutes-")
    done: list[dict] = []
    if known.out and Path(known.out).is_file():
        done = json.loads(Path(known.out).read_text())
    plan = [(t, float(m)) for m in known.minutes.split(",") for t in known.tasks.split(",")]
    for i, (task, minutes) in enumerate(plan):
        have = sum(1 for r in done if r["task"] == task and r["minutes"] == minutes
                   and (task != "chat" or (known.chat_preset or "chat-1min") in r["command"]))
        want = plan[:i + 1].count((task, minutes))
        if have >= want:
            continue
        r = one_run(task, minutes, runs_dir, known.text, extra, known.chat_preset)
        done.append(r)
        if known.out:
            Path(known.out).parent.mkdir(parents=True, exist_ok=True)
            Path(known.out).write_text(json.dumps(done, indent=1) + "\n")
        fig = ", ".join(f"{k} {v:.4g}" for k, v in (r["figure"] or {}).items())
        print(f"{task:>8} {minutes:>5g} min: wall {r['wall_seconds']:7.1f} s ({100 * r['error']:+.1f}%), "
              f"{r['steps']:,} steps {r['fits']}, training {100 * r['train_share']:.1f}% of the wall time, "
              f"LR at the last step {r['last_lr_factor']:.3g} x peak (final {r['min_lr_ratio']:g}); "
              f"{r['precision']}; {fig}", flush=True)
    print("targets: wall within 3% of M, at least 85% in training steps, the last step at the final LR")


if __name__ == "__main__":
    main()
