"""The row kernels' whole pass (``RowsModel.step_tokens``, what a served tick computes) built
from this checkout's source and from another's, alternating in one process: on a machine
whose speed moves 20% between minutes, two kernel versions are only comparable side by side.
Also the pass's own floor: R rows at position P read the weights once and their cached keys
and values (R x P x layers x 2 x d_model floats), and multiply 2 x R x parameters FLOPs; the
floor is the larger of those bytes over the rate this machine reads that many bytes and those
FLOPs over its measured matmul rate.

    python benchmarks/kernels_ab.py --against /path/to/other/checkout --checkpoint bench \\
        --runs-dir /tmp/tl/sl-runs --rows 1,8

Both sources are built under ``--kernels-root`` (about 50 s each the first time).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch
from common import add_model_args, matmul_rate, memory_bandwidth, model_run, print_machine


def source_of(checkout: Path) -> str:
    """The kernels' C++ source in another checkout, read without importing its package."""
    path = checkout / "src" / "trainlab" / "chat" / "kernels.py"
    spec = importlib.util.spec_from_file_location("other_trainlab_kernels", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"error: no kernels source at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SOURCE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--against", type=Path, required=True, help="another checkout (its src/trainlab/chat/kernels.py)")
    ap.add_argument("--kernels-root", type=Path, default=Path("/tmp/kernels-ab"), help="where both builds are kept")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--rounds", type=int, default=40, help="alternations; each times 10 passes of each version")
    args = ap.parse_args()
    print_machine()
    import trainlab.chat.kernels as K
    from trainlab.chat.decoding import forget_rows_model, rows_model
    from trainlab.chat.loading import load_chat_model
    from trainlab.engine.tracking import resolve_checkpoint

    mine = K.SOURCE
    built = {}
    for name, source in (("this", mine), ("against", source_of(args.against))):
        K.SOURCE = source  # load_kernels builds (and keys its folder by) the module's SOURCE
        try:
            built[name], note = K.load_kernels(args.kernels_root)
        finally:
            K.SOURCE = mine
        print(f"{name}: {note}", flush=True)
        if built[name] is None:
            raise SystemExit(1)
    runs, args.checkpoint = model_run(args, "kernels-ab-")
    model = load_chat_model(resolve_checkpoint(runs, "chat", args.checkpoint), torch.device("cpu")).model
    cfg = model.cfg
    L, H, hd, ctx = cfg.num_layers, cfg.nhead, cfg.d_model // cfg.nhead, cfg.context_len
    held = {}
    for name, module in built.items():
        forget_rows_model(model)
        held[name] = rows_model(model, module)
    params = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not model.tok.weight)
    weight_bytes = 4 * params
    rate = matmul_rate()
    g = torch.Generator().manual_seed(0)
    for rows in (int(r) for r in args.rows.split(",")):
        keys = torch.randn(L, max(8, rows), H, ctx, hd, generator=g) * 0.1  # (L, slots, H, ctx, hd)
        values = torch.randn(L, max(8, rows), H, ctx, hd, generator=g)
        tokens = torch.randint(0, cfg.vocab_size, (rows,), generator=g)
        idx, pos = torch.arange(rows), torch.full((rows,), ctx - 1)  # every row at the context's last position
        times: dict[str, list[float]] = {name: [] for name in held}
        for _ in range(args.rounds):
            for name, h in held.items():
                for _ in range(10):
                    t = time.perf_counter()
                    h.step_tokens(tokens, tokens, idx, pos, keys, values)
                    times[name].append(time.perf_counter() - t)
        a, b = (held[n].step_tokens(tokens, tokens, idx, pos, keys, values) for n in ("this", "against"))
        cache_bytes = 4 * rows * ctx * L * 2 * cfg.d_model
        nbytes = weight_bytes + cache_bytes
        bw = memory_bandwidth(nbytes)
        floor = max(nbytes / bw, 2 * rows * params / rate)
        med = {n: statistics.median(t) for n, t in times.items()}
        print(f"{rows} row(s) at position {ctx - 1}: this {1e3 * med['this']:.2f} ms (fastest "
              f"{1e3 * min(times['this']):.2f}), against {1e3 * med['against']:.2f} ms (fastest "
              f"{1e3 * min(times['against']):.2f}): this/against {med['this'] / med['against']:.2f}; "
              f"largest logit difference {(a - b).abs().max().item():.1e}", flush=True)
        print(f"    floor {1e3 * floor:.2f} ms: {weight_bytes / 1e6:.1f} MB of weights + {cache_bytes / 1e6:.1f} MB "
              f"of cache at {bw / 1e9:.1f} GB/s = {1e3 * nbytes / bw:.2f} ms, {2 * rows * params / 1e9:.3f} GFLOP at "
              f"{rate / 1e9:.0f} GFLOP/s = {1e3 * 2 * rows * params / rate:.2f} ms; this reaches "
              f"{floor / med['this']:.2f} of it", flush=True)


if __name__ == "__main__":
    main()
