"""What the engine's bookkeeping costs: engine.train() against a bare loop, same model and batches.

Target (issue 5): monitoring, the ETA and logging at the default interval cost under 5%
of step time.

    python benchmarks/engine_overhead.py                 # the chat nanogpt-cpu model, then multiply's demo
    python benchmarks/engine_overhead.py --task chat --steps 400 --rounds 3

The bare loop is what a hand-written script does: forward, backward, clip, AdamW step,
schedule step, nothing else. The engine runs the same task with its defaults (loss
trend and spike check, the non-finite guard, micro-batching, memory figures,
TensorBoard and the progress bar every 10 steps), with evaluation and checkpoints moved
past the end so that only bookkeeping differs. A step's time is the gap between two
calls of ``task.batch``, so it holds everything either loop does between steps; the
figure is the mean over the steps after a warmup (the last step, whose gap would run
into the final evaluation, is not counted in either). The two alternate, a few rounds
each, on the same process and threads, and the ratio of their medians is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from common import print_machine, scratch_dir  # noqa: E402

from trainlab import runs  # noqa: E402
from trainlab.cli import build_parser  # noqa: E402
from trainlab.cli.common import flags_of  # noqa: E402
from trainlab.config import build  # noqa: E402
from trainlab.engine.loop import train  # noqa: E402
from trainlab.engine.member import make_member
from trainlab.engine.tracking import clean_test_runs, new_run  # noqa: E402

WARMUP = 10


class Clocked:
    """The task, with the time of every ``batch`` call recorded."""

    def __init__(self, task) -> None:
        self.task, self.stamps = task, []

    def __getattr__(self, name):
        return getattr(self.task, name)

    def batch(self, step: int):
        self.stamps.append(time.perf_counter())
        return self.task.batch(step)

    def mean_step(self) -> float:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])][WARMUP:]
        return sum(gaps) / len(gaps)


def make(task_name: str, steps: int, runs_dir: str):
    if task_name == "chat":
        from trainlab.chat.task import make_chat_task

        text = str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
        args = build_parser().parse_args(["chat", "train", "--text", text, "--preset", "nanogpt-cpu"])
        factory = make_chat_task
    else:
        from trainlab.multiply.task import MultiplyTask

        args = build_parser().parse_args(["multiply", "train", "--preset", "demo"])

        def factory(c):
            return MultiplyTask(c["data"], c["model"], c["loss"], c["teacher_forcing"], c["task"], c["train"])
    values = runs.settings(task_name, args.preset, None, flags_of(args))
    sections = runs.task_kind(task_name).sections()
    # fp32 on both sides: the bare loop has no autocast to compare with
    values.update(max_steps=steps, eval_every=10**9, save_every=10**9, runs_dir=runs_dir, tag="test",
                  device="cpu", sample_every=0, precision="fp32")
    cfgs = {name: build(cls, values) for name, cls in sections}
    return factory(cfgs), cfgs


def bare(task_name: str, steps: int, runs_dir: str) -> float:
    task, cfgs = make(task_name, steps, runs_dir)
    cfg = cfgs["train"]
    clocked = Clocked(task)
    members = [make_member(k, m.train(), cfg) for k, m in task.build_models().items()]
    for step in range(steps):
        batch = clocked.batch(step)
        for m in members:
            loss = task.loss(m.name, m.model, batch, step).loss
            m.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.model.parameters(), cfg.grad_clip)
            m.optimizer.step()
            m.scheduler.step()
    return clocked.mean_step()


def engine(task_name: str, steps: int, runs_dir: str) -> float:
    task, cfgs = make(task_name, steps, runs_dir)
    clocked = Clocked(task)
    clocked.report = lambda run, summary: None
    config = {"train": vars(cfgs["train"])}
    run = new_run(runs_dir, task.name, "", "test", config)
    train(clocked, cfgs["train"], run, config, echo=lambda *a: None)
    return clocked.mean_step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("chat", "multiply", "both"), default="both")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print_machine()
    runs_dir = scratch_dir("overhead-")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; {args.steps} steps per run, "
          f"{args.rounds} rounds each, alternating")
    for task_name in (("chat", "multiply") if args.task == "both" else (args.task,)):
        times: dict[str, list[float]] = {"bare": [], "engine": []}
        for _ in range(args.rounds):
            times["bare"].append(bare(task_name, args.steps, runs_dir))
            times["engine"].append(engine(task_name, args.steps, runs_dir))
        b, e = statistics.median(times["bare"]), statistics.median(times["engine"])
        spread = ", ".join(f"{k} " + " ".join(f"{1000 * t:.2f}" for t in v) for k, v in times.items())
        print(f"{task_name:>8}: bare {1000 * b:.2f} ms/step, engine {1000 * e:.2f} ms/step, "
              f"overhead {100 * (e / b - 1):+.1f}% (target < 5%)   [{spread}]")
    clean_test_runs(runs_dir)


if __name__ == "__main__":
    main()
