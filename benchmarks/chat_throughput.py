"""Chat training speed, side by side in one run: trainlab against nanoGPT's own train.py.

    python benchmarks/chat_throughput.py --shape shakespeare-char --nanogpt /path/to/nanoGPT
    python benchmarks/chat_throughput.py --shape nanogpt-cpu --nanogpt /path/to/nanoGPT --steps 60

Shapes:
- ``nanogpt-cpu``: nanoGPT's README CPU configuration (4 layers, 4 heads, 128 wide,
  context 64, batch 12), trainlab's ``--preset nanogpt-cpu``;
- ``shakespeare-char``: nanoGPT's ``train_shakespeare_char.py`` model (6 layers, 6 heads,
  384 wide, context 256, batch 64; 10.65M parameters without position embeddings).

Contenders, run one after another (never two torch jobs at once on a small machine):
nanoGPT's ``train.py`` when ``--nanogpt`` points at a copy of its repository (the copy
is used read-only: the script and model are copied into a temporary folder with the
corpus encoded as its ``prepare.py`` would), then ``trainlab chat train`` with each
``--micro-batch`` setting (``--micro``, default off and auto) in each ``--precision``
(``--precisions``, default fp32; ``fp32,auto`` adds what auto picks on this CPU, timings
shown). nanoGPT runs in fp32: its train.py uses no autocast on a CPU. Dropout 0, no
compile, the same corpus (``../shared/data/tinyshakespeare.txt`` by default). Every
contender's line names the precision it trained in.

Each prints the median time per iteration over the steps after the first two (with
``--rounds N``, the median of N such figures, the contenders taking turns so a slow
spell of a shared machine falls on all of them), the tokens per second that gives, and the training loss at its last step (the data order
differs, so losses agree only roughly). nanoGPT's code is never part of this project.
"""

from __future__ import annotations

import argparse
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import precision_of, print_machine, tb_scalars

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "nanogpt-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, learning_rate=1e-3),
    "shakespeare-char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, learning_rate=1e-3),
}


def encode_like_nanogpt(text: str, folder: Path) -> None:
    """train.bin, val.bin and meta.pkl as nanoGPT's shakespeare_char/prepare.py makes them:
    sorted characters, the first 90% for training, uint16 ids."""
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    folder.mkdir(parents=True, exist_ok=True)
    ids[:n].tofile(folder / "train.bin")
    ids[n:].tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)


def nanogpt_copy(repo: Path, text: str, work: Path) -> Path:
    """``work``/nanogpt: nanoGPT's train.py, model.py, configurator.py and configs beside
    the corpus encoded for it (made once per ``work``; ``repo`` is only read)."""
    copy = work / "nanogpt"
    if not copy.exists():
        copy.mkdir()
        for name in ("train.py", "model.py", "configurator.py"):
            shutil.copy(repo / name, copy / name)
        shutil.copytree(repo / "config", copy / "config")
        encode_like_nanogpt(text, copy / "data" / "shakespeare_char")
    return copy


def run_nanogpt(repo: Path, text: str, shape: dict, steps: int, work: Path) -> tuple[list[float], float]:
    """Seconds per iteration and the last loss, from train.py's own log lines."""
    copy = nanogpt_copy(repo, text, work)
    flags = {**shape, "max_iters": steps, "lr_decay_iters": steps, "warmup_iters": 0, "dropout": 0.0,
             "device": "cpu", "compile": False, "dtype": "float32", "eval_interval": 10**9, "eval_iters": 1,
             "log_interval": 1, "gradient_accumulation_steps": 1, "min_lr": 1e-4, "dataset": "shakespeare_char", "always_save_checkpoint": False, "beta2": 0.99,
             "out_dir": str(work / "nanogpt-out")}
    cmd = [sys.executable, "train.py", *(f"--{k}={v}" for k, v in flags.items())]
    out = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, check=True).stdout
    lines = re.findall(r"iter (\d+): loss ([\d.]+), time ([\d.]+)ms", out)
    return [float(t) / 1000 for _, _, t in lines], float(lines[-1][1])


def run_trainlab(text_path: Path, shape_name: str, shape: dict, steps: int, micro: str, precision: str,
                 work: Path) -> tuple[list[float], float, str]:
    """Seconds per iteration (from the run's TensorBoard examples/s), the last loss and the
    precision it trained in."""
    runs = work / f"runs-{micro}-{precision}"
    if shape_name == "nanogpt-cpu":
        model = ["--preset", "nanogpt-cpu"]
    else:
        model = ["--d-model", str(shape["n_embd"]), "--num-layers", str(shape["n_layer"]), "--nhead",
                 str(shape["n_head"]), "--context-len", str(shape["block_size"]), "--batch-size",
                 str(shape["batch_size"]), "--lr", str(shape["learning_rate"]), "--beta2", "0.99"]
    cmd = [sys.executable, "-m", "trainlab", "chat", "train", "--text", str(text_path), "--runs-dir", str(runs),
           *model, "--max-steps", str(steps), "--dropout", "0", "--log-every", "1", "--eval-every", str(10**9),
           "--save-every", str(10**9), "--sample-every", "0", "--eval-batches", "1", "--warmup-steps", "0",
           "--precision", precision, "--micro-batch", micro, "--no-progress", "--run-name", "bench"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if "--micro-batch auto" in line or "--precision auto" in line:
            print("   ", line)
    folder = runs / "chat" / "bench" / "gpt"
    per_sec = [v for _, v in tb_scalars(folder, "perf/examples_per_sec")]
    loss = tb_scalars(folder, "train/loss")[-1][1]
    return [shape["batch_size"] / v for v in per_sec], loss, precision_of(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="shakespeare-char")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--nanogpt", type=Path, help="a copy of karpathy/nanoGPT (read only)")
    ap.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    ap.add_argument("--micro", default="off,auto", help="trainlab --micro-batch settings to run, comma-separated")
    ap.add_argument("--precisions", default="fp32", help="trainlab --precision settings to run, comma-separated "
                                                        "(e.g. fp32,auto)")
    ap.add_argument("--rounds", type=int, default=1, help="run every contender this many times, alternating")
    args = ap.parse_args()
    print_machine()
    shape = SHAPES[args.shape]
    text = args.text.read_text(encoding="utf-8")
    tokens = shape["batch_size"] * shape["block_size"]
    times: dict[str, list[float]] = {}  # contender -> the median s/iter of each round
    losses: dict[str, float] = {}
    modes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            work = Path(tmp) / f"round{r}"
            work.mkdir()
            runs = []
            if args.nanogpt:
                runs.append(("nanoGPT train.py",
                             lambda: (*run_nanogpt(args.nanogpt, text, shape, args.steps, work), "fp32")))
            for precision in args.precisions.split(","):
                for micro in args.micro.split(","):
                    runs.append((f"trainlab {precision} micro {micro}",
                                 lambda micro=micro, precision=precision: run_trainlab(
                                     args.text, args.shape, shape, args.steps, micro, precision, work)))
            for name, run in runs:
                step_times, losses[name], modes[name] = run()
                times.setdefault(name, []).append(statistics.median(step_times[2:] or step_times))
                print(f"  round {r} {name:28s} {times[name][-1] * 1000:9.1f} ms/iter")
    print(f"\n{args.shape}: batch {shape['batch_size']} x context {shape['block_size']}, {args.steps} steps, "
          f"median of the steps after the first two, then the median over {args.rounds} alternating round(s)")
    base = None
    for name, secs in times.items():
        sec = statistics.median(secs)
        base = base or tokens / sec
        print(f"  {name:28s} {sec * 1000:9.1f} ms/iter {tokens / sec:9.0f} tokens/s  {tokens / sec / base:5.2f}x  "
              f"last loss {losses[name]:.3f}  (rounds: {', '.join(f'{t * 1000:.0f}' for t in secs)})  "
              f"precision {modes[name]}")

if __name__ == "__main__":
    main()
