"""Crash safety, measured: kill runs at random moments, damage checkpoints, resume.

Part 1: one uninterrupted reference run, then N runs of the same settings, each
SIGKILLed at a random moment (sometimes twice: the second kill lands in the resumed
process), then resumed with ``--resume ID`` until they finish. Every run must finish
with weights, optimizer state and loss curve bit-identical to the reference. Saving
every 1-2 steps makes many kills land in the middle of a checkpoint write.

Part 2: a finished run's newest checkpoint damaged four ways (truncated, bit-flipped,
another task's, a pickle that runs code with a forged checksum). Resuming must report
it in one line, keep the damaged folder byte for byte, fall back to the previous good
checkpoint and end where the undamaged run ended.

    python benchmarks/crash_safety.py --trials 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from trainlab.engine.checkpoint import latest_checkpoint  # noqa: E402
from trainlab.engine.faults import DAMAGE_KINDS, damage_checkpoint  # noqa: E402
from common import print_machine, scratch_dir  # noqa: E402

TASK = "parallel_comparison"
FLAGS = ["--max-digits", "2", "--d-model", "64", "--num-layers", "2", "--num-latent", "4", "--batch-size", "32",
         "--dropout", "0.1", "--tf-schedule", "linear", "--tf-decay-steps", "30", "--warmup-steps", "5",
         "--eval-every", "10", "--eval-samples", "50", "--log-every", "3", "--no-progress", "--device", "cpu",
         "--tag", "test"]


def command(runs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainlab", "multiply", "train", "--runs-dir", str(runs), *FLAGS, *extra]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), TRAINLAB_FAULTS="")


def final(runs: Path, name: str) -> dict:
    ck = latest_checkpoint(runs / TASK / name / "checkpoints", TASK)
    out = {"step": ck.step}
    for n in sorted(ck.sums):
        if n.endswith("/model.pt"):
            out[n] = ck.tensors(n)
        elif n.endswith("/train_state.pt"):
            s = ck.tensors(n)
            out[n] = {k: s[k] for k in ("optimizer", "scheduler", "step", "examples", "losses")}
    return out


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def loss_curve(runs: Path, name: str, member: str = "simple") -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs / TASK / name / member), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/loss")]


def training_started(run_json: Path, pid: int) -> bool:
    try:
        return json.loads(run_json.read_text()).get("pid") == pid
    except (OSError, ValueError):
        return False


def kill_after(cmd: list[str], seconds: float, run: Path, at_start: bool = False) -> tuple[bool, bool]:
    """Run ``cmd`` and SIGKILL it ``seconds`` after it begins training (after it starts,
    with ``at_start``). Returns (killed, a checkpoint write was cut short)."""
    p = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not at_start and p.poll() is None and not training_started(run / "run.json", p.pid):
        time.sleep(0.01)
    try:
        p.wait(timeout=seconds)
        return False, False
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
    ckpts = run / "checkpoints"
    cut = ckpts.is_dir() and any(x.name.startswith((".tmp-", ".old-", ".del-")) for x in ckpts.iterdir())
    return True, cut


def kill_trials(work: Path, trials: int, steps: int, rng: random.Random) -> bool:
    runs = work / "kill"
    subprocess.run(command(runs, "--max-steps", str(steps), "--save-every", "1", "--run-name", "reference"),
                   env=env(), check=True, capture_output=True)
    info = json.loads((runs / TASK / "reference" / "run.json").read_text())
    from datetime import datetime
    span = (datetime.fromisoformat(info["updated"]) - datetime.fromisoformat(info["created"])).total_seconds()
    ref, ref_curve = final(runs, "reference"), loss_curve(runs, "reference")
    print(f"reference: {steps} steps, saving every step, {span:.1f} s from start of training to the end")
    print(f"{'trial':>5} {'save every':>10} {'kills':>5} {'mid-save':>8} {'resumes':>7} {'final step':>10} "
          f"{'identical':>9} {'curve':>6}")
    ok = same_n = curve_n = mid_saves = kills_total = 0
    for i in range(trials):
        name = f"trial{i:02d}"
        run = runs / TASK / name
        save_every = rng.choice([1, 1, 2, 3])
        fresh = command(runs, "--max-steps", str(steps), "--save-every", str(save_every), "--run-name", name)
        kills = cut_saves = resumes = 0
        at_start = i % 5 == 4  # every fifth run dies while starting up, often before any checkpoint
        delay = rng.uniform(0.5, 4.0) if at_start else rng.uniform(0, 0.8 * span)
        killed, cut = kill_after(fresh, delay, run, at_start)
        while not killed:  # it finished first (fewer saves run faster): again, sooner
            subprocess.run([sys.executable, "-m", "trainlab", "runs", "rm", f"{TASK}/{name}", "--runs-dir", str(runs)],
                           env=env(), check=True, capture_output=True)
            delay /= 2
            killed, cut = kill_after(fresh, delay, run, at_start)
        kills += killed
        cut_saves += cut
        if not (run / "run.json").exists():  # died before its run folder existed: start it again
            subprocess.run(fresh, env=env(), capture_output=True)
        if killed and rng.random() < 0.5:  # a second kill, in the resumed process
            killed, cut = kill_after(command(runs, "--resume", name), rng.uniform(0, span), run)
            kills += killed
            cut_saves += cut
            resumes += 1
        code = None
        for _ in range(3):
            out = subprocess.run(command(runs, "--resume", name), env=env(), capture_output=True, text=True)
            resumes += 1
            code = out.returncode
            if code == 0:
                break
        got = final(runs, name) if code == 0 else {"step": None}
        identical = code == 0 and same(got, ref)
        curve = code == 0 and loss_curve(runs, name) == ref_curve
        ok += code == 0
        same_n += identical
        curve_n += curve
        mid_saves += cut_saves
        kills_total += kills
        print(f"{i:>5} {save_every:>10} {kills:>5} {cut_saves:>8} {resumes:>7} {str(got['step']):>10} "
              f"{'yes' if identical else 'NO':>9} {'yes' if curve else 'NO':>6}")
    print(f"\nkill test: {ok}/{trials} resumed to the end, {same_n}/{trials} bit-identical weights and optimizer "
          f"state, {curve_n}/{trials} identical TensorBoard loss curves; {kills_total} SIGKILLs, "
          f"{mid_saves} of them in the middle of a checkpoint write")
    return ok == same_n == curve_n == trials


def corruption_trials(work: Path) -> bool:
    runs = work / "damage"
    subprocess.run(command(runs, "--max-steps", "20", "--save-every", "5", "--keep-checkpoints", "5",
                           "--run-name", "base"), env=env(), check=True, capture_output=True)
    good = final(runs, "base")
    print(f"\n{'damage':>17} {'exit':>4} {'warning lines':>13} {'resumed from':>12} {'kept aside':>10} "
          f"{'code ran':>8} {'same end':>8}")
    all_ok = True
    for kind in DAMAGE_KINDS:
        name = kind.replace(" ", "-")
        shutil.copytree(runs / TASK / "base", runs / TASK / name)
        info = json.loads((runs / TASK / name / "run.json").read_text())
        info["id"] = name
        (runs / TASK / name / "run.json").write_text(json.dumps(info))
        ckpts = runs / TASK / name / "checkpoints"
        target = work / f"pwned-{name}"
        damage_checkpoint(ckpts / "step_0000020", kind, target)
        before = {p.relative_to(ckpts / "step_0000020"): p.read_bytes()
                  for p in (ckpts / "step_0000020").rglob("*") if p.is_file()}
        out = subprocess.run(command(runs, "--resume", name), env=env(), capture_output=True, text=True)
        warnings = [line for line in out.stderr.splitlines() if "step_0000020" in line]
        start = next((line.split("from step ")[1].split(":")[0] for line in out.stdout.splitlines()
                      if line.startswith("resuming run")), "?")
        aside = [p for p in ckpts.iterdir() if p.name.startswith("damaged-step_0000020")]
        kept = len(aside) == 1 and {p.relative_to(aside[0]): p.read_bytes()
                                    for p in aside[0].rglob("*") if p.is_file()} == before
        end_same = out.returncode == 0 and same(final(runs, name), good)
        ran = target.exists()
        ok = out.returncode == 0 and len(warnings) == 1 and start == "15" and kept and not ran and end_same
        all_ok &= ok
        print(f"{kind:>17} {out.returncode:>4} {len(warnings):>13} {start:>12} {'yes' if kept else 'NO':>10} "
              f"{'YES' if ran else 'no':>8} {'yes' if end_same else 'NO':>8}")
        for line in warnings:
            print(f"{'':>19}{line[:150]}")
    # the only checkpoint of a run damaged, read directly: a one-line error, nothing written
    lone = runs / TASK / "base" / "checkpoints" / "step_0000020"
    (lone / "latent" / "model.pt").write_bytes(b"not a checkpoint")
    out = subprocess.run([sys.executable, "-m", "trainlab", "multiply", "ask", str(lone), "3*4"], env=env(),
                         capture_output=True, text=True)
    one = out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    print(f"\nasking a damaged checkpoint directly: exit {out.returncode}, {out.stderr.strip()[:150]}")
    return all_ok and one


def main() -> int:
    import logging

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # it warns about every purge it applies
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where runs go (default: a temporary folder, removed at the end)")
    args = ap.parse_args()
    print_machine()
    work = Path(args.workdir) if args.workdir else Path(scratch_dir("trainlab-crash-"))
    ok = kill_trials(work, args.trials, args.steps, random.Random(args.seed))
    ok &= corruption_trials(work)
    print("\nALL PASSED" if ok else "\nFAILURES above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
