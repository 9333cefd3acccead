"""Peak training memory of the 14M chat model with and without gradient checkpointing.

Target (issue 5): at context 256, batch 32, checkpointing lowers the peak by at least 30%.

    python benchmarks/grad_checkpointing_memory.py                    # CPU: peak RSS
    python benchmarks/grad_checkpointing_memory.py --device cuda      # GPU: peak allocated

Each setting runs in a fresh process (a process's memory high-water mark only goes up):
it builds the chatgot-14m model and its AdamW, takes one training step so that the
optimizer state exists, then measures a second step. On CPU the figure is the peak
resident memory during that step (VmHWM, reset through /proc/self/clear_refs) minus the
resident memory before the model was built: weights, gradients, AdamW state,
activations and scratch. On CUDA it is torch's peak allocated memory during the step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import print_machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MIB = 2.0**20


def status_kib(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def child(checkpointing: bool, device_name: str, batch: int, context: int) -> dict:
    import torch
    import torch.nn.functional as F

    from trainlab.chat.config import GPTConfig
    from trainlab.chat.model import GPT
    from trainlab.config import load_preset
    from trainlab.engine.member import make_member
    from trainlab.engine.train_config import TrainConfig

    device = torch.device(device_name)
    before = status_kib("VmRSS") * 1024 if device.type == "cpu" else 0
    preset = load_preset("chat", "chatgot-14m")
    fields = {k: v for k, v in preset.items() if k in GPTConfig.__dataclass_fields__}
    cfg = GPTConfig(**{**fields, "context_len": context, "vocab_size": 65, "grad_checkpointing": checkpointing})
    torch.manual_seed(0)
    member = make_member("gpt", GPT(cfg).to(device).train(), TrainConfig(batch_size=batch), device)
    x = torch.randint(0, 65, (batch, context), device=device)
    y = torch.randint(0, 65, (batch, context), device=device)

    def step() -> float:
        t = time.perf_counter()
        logits, _ = member.model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        member.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        member.optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    step()  # AdamW allocates its state on the first step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        seconds = step()
        peak = torch.cuda.max_memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        seconds = step()
        peak = status_kib("VmHWM") * 1024 - before
    return {"peak_mib": peak / MIB, "seconds": seconds, "parameters": member.num_parameters}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--context-len", type=int, default=256)
    ap.add_argument("--child", choices=("plain", "checkpointing"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    print_machine()
    if args.child:
        print(json.dumps(child(args.child == "checkpointing", args.device, args.batch_size, args.context_len)))
        return
    results = {}
    for mode in ("plain", "checkpointing"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--device", args.device, "--batch-size",
                              str(args.batch_size), "--context-len", str(args.context_len)],
                             capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    plain, ckpt = results["plain"], results["checkpointing"]
    what = "peak allocated" if args.device.startswith("cuda") else "peak RSS above the bare process"
    print(f"chatgot-14m ({plain['parameters']:,} parameters), fp32, context {args.context_len}, batch {args.batch_size}, "
          f"{args.device}; {what}, one training step:")
    for mode, r in results.items():
        print(f"  {mode:>13}: {r['peak_mib']:8.0f} MiB   {r['seconds']:.2f} s/step")
    saved = 1 - ckpt["peak_mib"] / plain["peak_mib"]
    print(f"checkpointing lowers the peak by {100 * saved:.0f}% (target >= 30%) for "
          f"{ckpt['seconds'] / plain['seconds']:.2f}x the step time")


if __name__ == "__main__":
    main()
