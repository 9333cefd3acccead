"""The first run on a GPU, in one command: what trainlab does there, measured, with one JSON
and one log of everything, written after every part so that a run cut short still reports.

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out gpu-check            # on the GPU, about 8 minutes
    PYTHONPATH=src python3 benchmarks/gpu_check.py --out gpu-check --nanogpt build/nanoGPT \
        --text build/tinyshakespeare.txt
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gpu-check   # the same parts in seconds (the suite)

Parts, most important first, each with its own time cap (``CAPS``, seconds on the GPU):

1. ``nanogpt_settings``: nanoGPT's shakespeare_char recipe (6 layers of 384, context 256,
   batch 64, dropout 0.2, AdamW 1e-3 decayed to 1e-4 over 5,000 steps, bf16) trained by
   trainlab: val loss at steps 1,000-5,000 on 200 fixed val batches (nanoGPT estimates on
   200 random ones; its published figure is 1.4697), the loss over the whole val span at the
   end, and the wall time;
2. ``best_recipe``: ``chat train --preset auto --minutes 2``: what it chose, its whole-span
   loss and wall time;
3. ``throughput``: characters/s and MFU of trainlab at nanoGPT's shape, compiled and not,
   beside nanoGPT's own ``train.py`` on the same GPU when ``--nanogpt PATH`` gives a copy
   of it (its ``train.py`` and ``model.py``; the corpus is written in its format here);
4. ``kill_resume``: a run SIGKILLed mid-way and resumed ends with the same weights as an
   unbroken one, bit for bit (with ``torch.use_deterministic_algorithms`` where CUDA's
   kernels are not deterministic: the part says which it needed);
5. ``precisions``: ``--precision auto`` (bf16 from Ampere on), ``fp16`` with its loss scaler
   and ``fp32`` with TF32: the mode each ran in, its pace and its final loss;
6. ``torchrun``: ``torchrun --nproc_per_node 1`` (NCCL) against a single process: the same
   losses;
7. ``serve``: ``chat serve`` on the GPU: one stream and 8 at once, characters/s each
   (skipped in one line where the server's packages are missing);
8. ``export``: ``chat export`` of the GPU-trained model loads in transformers and gives
   the same greedy text as ``chat generate``.

Runs from the source tree (``PYTHONPATH=src``) on whatever torch the machine has (the device
machine has 2.11, not the project's pin). The suite runs it with ``--device cpu --tiny`` so
it cannot rot before a GPU comes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import scratch_dir, tb_scalars  # noqa: E402

# seconds each part may take on a GPU (8 minutes in all); --tiny gives each a minute
CAPS = {"nanogpt_settings": 150, "best_recipe": 150, "throughput": 60, "kill_resume": 30, "precisions": 30,
        "torchrun": 25, "serve": 25, "export": 20}
NANOGPT = ["--preset", "nanogpt-cpu", "--d-model", "384", "--num-layers", "6", "--nhead", "6", "--context-len", "256",
           "--batch-size", "64", "--dropout", "0.2", "--lr", "1e-3", "--min-lr-ratio", "0.1", "--warmup-steps", "100",
           "--beta2", "0.99", "--weight-decay", "0.1", "--grad-clip", "1.0"]
TINY_SHAPE = ["--preset", "chatgot-tiny", "--dropout", "0.0"]
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "RTX 4090": 165e12, "RTX 3090": 71e12}  # dense bf16 FLOP/s from the makers' sheets


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.device, self.tiny = args, args.device, args.tiny
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.runs = Path(args.runs_dir) if args.runs_dir else Path(scratch_dir("gpu-check-runs-"))
        self.runs.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.out / "log.txt", "a", encoding="utf-8")
        self.result: dict[str, Any] = {"machine": machine(args.device), "parts": {}}
        self.deadline = 0.0

    def log(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def save(self) -> None:
        path = self.out / "results.json"
        path.with_suffix(".partial").write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        path.with_suffix(".partial").replace(path)

    def left(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def trainlab(self, *args: str, env: dict[str, str] | None = None, runner: list[str] | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
        """A trainlab command on this machine's device, within the part's time left; its output logged."""
        cmd = [*(runner or [sys.executable, "-m"]), "trainlab", *args]
        if args[:2] in (("chat", "train"), ("chat", "serve"), ("chat", "generate")) and "--device" not in args:
            cmd += ["--device", self.device]
        if args[:2] == ("chat", "train") and "--resume" not in args:
            cmd += ["--runs-dir", str(self.runs), "--no-progress", "--text", str(self.args.text)]
        self.log("$ " + " ".join(cmd[cmd.index("trainlab"):]))
        full_env = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.left(), env=full_env)
        for line in (p.stdout + p.stderr).splitlines()[-40:]:
            self.log("  " + line)
        if check and p.returncode != 0:
            raise RuntimeError(f"exit {p.returncode}: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
        return p

    def run_json(self, name: str) -> dict[str, Any]:
        return json.loads((self.runs / "chat" / name / "run.json").read_text())

    def report_span(self, name: str) -> float | None:
        m = re.search(r"whole val span: \*\*([\d.]+)\*\*", (self.runs / "chat" / name / "report.md").read_text())
        return float(m.group(1)) if m else None


def machine(device: str) -> dict[str, Any]:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device, "date": time.strftime("%Y-%m-%d")}
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    bf16=torch.cuda.is_bf16_supported())
    else:
        from trainlab.engine.precision import cpu_summary

        info["cpu"] = cpu_summary()
    return info


def val_curve(output: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"\[step (\d+)\] gpt: val_loss ([\d.]+)", output)}


def examples_per_sec(run_dir: Path) -> float | None:
    """The median of the run's logged examples/s, the first interval (compiling, warm-up) left out."""
    try:
        values = [v for _, v in tb_scalars(run_dir / "gpt", "perf/examples_per_sec")]
    except KeyError:  # no interval logged
        return None
    return statistics.median(values[1:] or values) if values else None


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return tb_scalars(run_dir / "gpt", "train/loss")


# -- the parts --------------------------------------------------------------------------------
def nanogpt_settings(c: Check) -> dict[str, Any]:
    steps, every, batches = (5000, 1000, 200) if not c.tiny else (20, 10, 2)
    shape = NANOGPT if not c.tiny else TINY_SHAPE
    t = time.monotonic()
    p = c.trainlab("chat", "train", *shape, "--max-steps", str(steps), "--eval-every", str(every), "--eval-batches",
                   str(batches), "--save-every", str(steps), "--sample-every", "0", "--log-every", "50" if not c.tiny
                   else "5", "--precision", "bf16" if c.device != "cpu" else "fp32", "--run-name", "nanogpt")
    curve = val_curve(p.stdout)
    return {"val_loss_by_step": curve, "whole_span": c.report_span("nanogpt"), "wall_seconds": round(time.monotonic()
            - t, 1), "nanogpt_published": 1.4697, "steps": steps}


def best_recipe(c: Check) -> dict[str, Any]:
    # tiny: 30 s, since 18 s could not hold set-up, the probe, one evaluation and the report on a
    # 2-core AVX2 EPYC beside another test worker (refused: "need at least 0.4 minutes")
    minutes = "2" if not c.tiny else "0.5"
    t = time.monotonic()
    p = c.trainlab("chat", "train", "--preset", "auto", "--minutes", minutes, "--run-name", "auto")
    info = c.run_json("auto")
    return {"minutes": float(minutes), "chose": (info.get("auto") or {}).get("preset"),
            "probes": (info.get("auto") or {}).get("probes"), "whole_span": c.report_span("auto"),
            "steps": info.get("step"), "wall_seconds": round(time.monotonic() - t, 1),
            "auto_line": next((ln for ln in p.stdout.splitlines() if ln.startswith("--preset auto:")), None)}


def throughput(c: Check) -> dict[str, Any]:
    from trainlab import auto, runs

    shape = NANOGPT if not c.tiny else TINY_SHAPE
    steps = "120" if not c.tiny else "10"
    flags = {"d_model": 384, "num_layers": 6, "nhead": 6, "context_len": 256, "dim_feedforward": 0} if not c.tiny \
        else {}
    values = runs.settings("chat", "nanogpt-cpu" if not c.tiny else "chatgot-tiny", flags={"text": str(c.args.text),
                                                                                           **flags})
    per_char = auto.flops_per_char(values)
    peak = next((v for k, v in PEAK_BF16.items() if k in c.result["machine"].get("gpu", "")), None)
    out: dict[str, Any] = {"flops_per_char": per_char, "peak_bf16": peak}
    # compiling takes about 30 s on 2 CPU cores: the suite's --tiny check leaves it to its own test
    for compiled in (False, True) if not c.tiny else (False,):
        name = f"speed-{'compiled' if compiled else 'eager'}"
        c.trainlab("chat", "train", *shape, "--max-steps", steps, "--eval-every", "100000", "--save-every", "100000",
                   "--log-every", "10" if not c.tiny else "2", "--sample-every", "0", "--run-name", name,
                   "--precision", "bf16" if c.device != "cpu" else "fp32", *(["--compile"] if compiled else []))
        eps = examples_per_sec(c.runs / "chat" / name)
        chars = eps * values["context_len"] if eps else None
        out[name] = {"chars_per_sec": chars, "mfu": chars * per_char / peak if chars and peak else None}
    if c.args.nanogpt:
        out["nanogpt"] = nanogpt_train_py(c, Path(c.args.nanogpt))
    else:
        c.log("throughput: nanoGPT's train.py not measured (no --nanogpt PATH)")
        out["nanogpt"] = "not given"
    return out


def nanogpt_train_py(c: Check, path: Path) -> dict[str, Any]:
    """nanoGPT's own train.py at its shakespeare_char settings, its data written from --text in
    its format (uint16 ids of the sorted characters, and meta.pkl), ms per iteration parsed."""
    import pickle

    import numpy as np

    work = Path(scratch_dir("nanogpt-"))
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copy(path / name, work / name)
    shutil.copytree(path / "config", work / "config")
    text = Path(c.args.text).read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = work / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    n = int(0.9 * len(text))
    np.array([stoi[ch] for ch in text[:n]], dtype=np.uint16).tofile(data / "train.bin")
    np.array([stoi[ch] for ch in text[n:]], dtype=np.uint16).tofile(data / "val.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    out = {}
    for compiled in (False, True):
        iters = 120 if not c.tiny else 6
        cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", f"--max_iters={iters}",
               f"--lr_decay_iters={iters}", "--eval_interval=100000", "--log_interval=10", f"--compile={compiled}",
               f"--device={c.device}", "--always_save_checkpoint=False", "--eval_iters=1"]
        if c.tiny:
            cmd += ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--dtype=float32"]
        c.log("$ " + " ".join(cmd))
        p = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=c.left())
        ms = [float(x) for x in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", p.stdout)][2:]
        block, batch = (256, 64) if not c.tiny else (32, 8)
        out["compiled" if compiled else "eager"] = {
            "ms_per_iter": statistics.median(ms) if ms else None,
            "chars_per_sec": batch * block / (statistics.median(ms) / 1000) if ms else None,
            "exit": p.returncode}
    return out


def kill_resume(c: Check) -> dict[str, Any]:
    import torch

    from trainlab.engine.checkpoint import latest_checkpoint

    steps, kill = ("200", "120") if not c.tiny else ("12", "7")
    base = ["chat", "train", "--preset", "chat-quick", "--max-steps", steps, "--save-every", "40" if not c.tiny else
            "5", "--eval-every", "100000", "--sample-every", "0"]
    if c.tiny:
        base[3] = "chatgot-tiny"

    def weights(name: str) -> dict[str, torch.Tensor]:
        ck = latest_checkpoint(c.runs / "chat" / name / "checkpoints")
        return {n: ck.tensors(n) for n in ck.sums if n.endswith(".pt") and n != "trainer.pt"}

    def same(a: str, b: str) -> bool:
        wa, wb = weights(a), weights(b)
        for n in wa:
            if n.endswith("train_state.pt"):
                continue
            x, y = wa[n], wb[n]
            if isinstance(x, dict):
                if any(not torch.equal(x[k], y[k]) for k in x if isinstance(x[k], torch.Tensor)):
                    return False
        return True

    out: dict[str, Any] = {}
    for deterministic in (False, True):
        env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "TRAINLAB_DETERMINISTIC": "1"} if deterministic else {}
        tag = "det" if deterministic else "plain"
        c.trainlab(*base, "--run-name", f"straight-{tag}", env=env)
        killed = c.trainlab(*base, "--run-name", f"killed-{tag}", env={**env, "TRAINLAB_FAULTS": f"kill={kill}"},
                            check=False)
        c.trainlab("chat", "train", "--resume", f"killed-{tag}", "--runs-dir", str(c.runs), "--no-progress",
                   "--device", c.device, env=env)
        identical = same(f"straight-{tag}", f"killed-{tag}")
        out[tag] = {"killed_exit": killed.returncode, "bit_identical": identical}
        if identical:
            break
    return out


def precisions(c: Check) -> dict[str, Any]:
    shape = NANOGPT if not c.tiny else TINY_SHAPE
    steps = "60" if not c.tiny else "6"
    modes = ("auto", "fp16", "fp32") if c.device != "cpu" else ("auto", "fp32")
    out = {}
    for mode in modes:
        name = f"precision-{mode}"
        p = c.trainlab("chat", "train", *shape, "--max-steps", steps, "--eval-every", "100000", "--save-every",
                       "100000", "--log-every", "10" if not c.tiny else "2", "--sample-every", "0", "--precision", mode,
                       "--run-name", name)
        info = c.run_json(name)
        ran = re.findall(r"precision (\w+)", p.stdout) + re.findall(r"--precision auto: (\w+)", p.stdout)
        losses = train_losses(c.runs / "chat" / name)
        out[mode] = {"ran_in": ran[-1] if ran else None, "fp32_matmul": info.get("fp32_matmul"),
                     "examples_per_sec": examples_per_sec(c.runs / "chat" / name),
                     "last_train_loss": losses[-1][1] if losses else None}
    return out


def torchrun(c: Check) -> dict[str, Any]:
    common = ["chat", "train", *TINY_SHAPE, "--max-steps", "30", "--log-every", "5", "--eval-every", "100000",
              "--save-every", "100000", "--sample-every", "0", "--precision", "fp32"]
    c.trainlab(*common, "--run-name", "single")
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m"]
    c.trainlab(*common, "--run-name", "torchrun", runner=runner, env={"OMP_NUM_THREADS": "1"})
    a, b = train_losses(c.runs / "chat" / "single"), train_losses(c.runs / "chat" / "torchrun")
    diff = max((abs(x[1] - y[1]) for x, y in zip(a, b)), default=None)
    return {"steps_compared": len(a), "same_steps": [s for s, _ in a] == [s for s, _ in b], "max_loss_diff": diff,
            "backend": "nccl" if c.device.startswith("cuda") else "gloo"}


def serve(c: Check) -> dict[str, Any]:
    try:
        import httpx  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        c.log(f"serve: skipped ({e.name} is not installed here)")
        return {"skipped": f"{e.name} not installed"}
    import asyncio

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = "nanogpt" if (c.runs / "chat" / "nanogpt").is_dir() else "auto"
    cmd = [sys.executable, "-m", "trainlab", "chat", "serve", "--checkpoint", model, "--runs-dir", str(c.runs),
           "--device", c.device, "--port", str(port), "--quiet"]
    c.log("$ " + " ".join(cmd[2:]))
    server = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(SRC)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    chars = 300 if not c.tiny else 40
    started = time.monotonic()
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > c.deadline:
                # stopped before its output is read: reading a live server's stdout waits for an end
                # that never comes (the suite hung here when the kernels' build outlasted the cap)
                server.kill()
                said = server.communicate(timeout=15)[0] or ""
                raise RuntimeError(f"the server did not come up in {time.monotonic() - started:.0f} s: {said[-300:]}")
            time.sleep(0.3)

        async def stream(client: httpx.AsyncClient, seed: int) -> tuple[int, float]:
            body = {"model": model, "prompt": "ROMEO:\n", "max_tokens": chars, "seed": seed, "stream": True,
                    "stop_at": "none"}
            t, n = time.perf_counter(), 0
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        n += len(json.loads(line[6:])["choices"][0].get("text") or "")
            return n, n / (time.perf_counter() - t)

        async def many(k: int) -> list[tuple[int, float]]:
            async with httpx.AsyncClient(timeout=c.left()) as client:
                return await asyncio.gather(*(stream(client, s) for s in range(k)))

        one, eight = asyncio.run(many(1)), asyncio.run(many(8))
        return {"one_stream_chars_per_sec": one[0][1], "eight_streams_chars_per_sec_each": min(r for _, r in eight),
                "chars": [n for n, _ in eight]}
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()


def export(c: Check) -> dict[str, Any]:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        c.log("export: skipped (transformers is not installed here)")
        return {"skipped": "transformers not installed"}
    import torch

    model = "nanogpt" if (c.runs / "chat" / "nanogpt").is_dir() else "auto"
    folder = Path(scratch_dir("gpu-export-")) / "hf"
    c.trainlab("chat", "export", "--checkpoint", model, "--runs-dir", str(c.runs), "--out", str(folder))
    # the corpus's first line (every character known to the model); within the context: transformers does not slide
    prompt, n = Path(c.args.text).read_text(encoding="utf-8").split("\n", 1)[0][:40] + "\n", 200 if not c.tiny else 20
    p = c.trainlab("chat", "generate", "--checkpoint", model, "--runs-dir", str(c.runs), "--prompt", prompt,
                   "--temperature", "0", "--max-new-tokens", str(n), "--stop-at", "none")
    ours = p.stdout[len(prompt):-1]  # generate prints the prompt, the completion and one newline
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder).to(c.device).eval()
    ids = torch.tensor([tok(prompt)["input_ids"]], device=c.device)
    with torch.no_grad():
        got = hf.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:]
    theirs = tok.decode(got.tolist())
    return {"same_greedy_text": theirs == ours, "chars": n, "architecture": type(hf).__name__, "prompt": prompt,
            "text": ours if theirs == ours else {"trainlab": ours, "transformers": theirs}}


PARTS: list[tuple[str, Callable[[Check], dict[str, Any]]]] = [
    ("nanogpt_settings", nanogpt_settings), ("best_recipe", best_recipe), ("throughput", throughput),
    ("kill_resume", kill_resume), ("precisions", precisions), ("torchrun", torchrun), ("serve", serve),
    ("export", export)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="every part at a size that takes seconds (the suite's check)")
    ap.add_argument("--out", required=True, help="folder for results.json and log.txt")
    ap.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    ap.add_argument("--nanogpt", help="a copy of nanoGPT (train.py, model.py, configurator.py, config/)")
    ap.add_argument("--parts", default=",".join(name for name, _ in PARTS))
    ap.add_argument("--runs-dir", help="where the check's runs go (default: a new temporary folder); the server's "
                                       "row kernels are built under it once (RUNS/.compiled)")
    args = ap.parse_args(argv)
    if not args.text.is_file():
        raise SystemExit(f"gpu_check: no corpus at {args.text} (--text)")
    c = Check(args)
    c.log(f"machine: {c.result['machine']}")
    wanted = args.parts.split(",")
    for name, part in PARTS:
        if name not in wanted:
            continue
        cap = CAPS[name] if not args.tiny else 60
        c.deadline = time.monotonic() + cap
        t = time.monotonic()
        c.log(f"== {name} (at most {cap} s)")
        try:
            r = part(c)
        except subprocess.TimeoutExpired:
            r = {"error": f"over its {cap} s cap"}
        except Exception as e:  # noqa: BLE001 (a part that fails is reported, and the next one runs)
            r = {"error": f"{type(e).__name__}: {e}"[:500]}
            c.log(traceback.format_exc())
        r["seconds"] = round(time.monotonic() - t, 1)
        c.result["parts"][name] = r
        c.log(f"{name}: {json.dumps(r, default=str)[:1000]}")
        c.save()
    failed = [n for n, r in c.result["parts"].items() if "error" in r]
    c.log(f"done: {len(c.result['parts'])} parts, {len(failed)} failed {failed or ''}; {c.out / 'results.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
