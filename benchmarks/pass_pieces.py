"""Where a row-kernel pass goes, piece by piece: the kernels are built once more with a clock
read between the pieces of each block (the norm and q/k/v product, QK-norm and rotation,
attention, the output product and residual, the second norm, the MLP's up product, its gate
product and activation, its down product and residual), and R rows decode at the context's
last position. The timed build is a copy of the source with timers added, kept apart from
the served one; the clock reads cost about a microsecond each, 64 a pass.

    python benchmarks/pass_pieces.py --checkpoint bench --runs-dir /tmp/tl/sl-runs --rows 1,8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import add_model_args, model_run, print_machine

PIECES = ["norm + qkv", "qk-norm + rotation", "attention", "out product + residual", "second norm", "up product",
          "gate + activation", "down product + residual"]
# (a line of rows_block, the piece that ends there)
MARKS = [("  auto q = qkv.select(1, 0)", 0), ("  auto y = rows_attend(", 1), ("  x = x + plus_bias(proj_w(y.view", 2),
         ("  auto h = rows_norm(x, ln2_w", 3), ("  auto up = plus_bias(up_w(h), up_b);", 4),
         ("  float* u = up.data_ptr<float>();", 5)]


def timed_source(source: str) -> str:
    """The kernels' source with a clock read after each piece of ``rows_block`` and a
    ``timers()`` that returns the seconds summed per piece (and zeroes them)."""
    def once(old: str, new: str) -> None:
        nonlocal source
        if source.count(old) != 1:
            raise SystemExit(f"error: the kernels' source changed; update pass_pieces.py ({old.strip()!r})")
        source = source.replace(old, new)

    once("#include <vector>\n", "#include <vector>\n#include <chrono>\nstatic double TIMES[8];\n"
         "static inline double clock_now() {\n  return std::chrono::duration<double>("
         "std::chrono::steady_clock::now().time_since_epoch()).count();\n}\n")
    once("  auto qkv = plus_bias(qkv_w(rows_norm", "  double t_ = clock_now();\n  auto qkv = plus_bias(qkv_w(rows_norm")
    for line, piece in MARKS:
        once(line, f"  TIMES[{piece}] += clock_now() - t_;\n  t_ = clock_now();\n{line}")
    once("  return x + plus_bias(down_w(up), down_b);\n}",
         "  TIMES[6] += clock_now() - t_;\n  t_ = clock_now();\n  auto out_ = x + plus_bias(down_w(up), down_b);\n"
         "  TIMES[7] += clock_now() - t_;\n  return out_;\n}")
    once("PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {",
         "std::vector<double> timers() {\n  std::vector<double> v(TIMES, TIMES + 8);\n  for (auto& t : TIMES) t = 0;\n"
         "  return v;\n}\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n  m.def(\"timers\", &timers);")
    return source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--kernels-root", type=Path, default=Path("/tmp/kernels-pieces"), help="where the timed build is kept")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--passes", type=int, default=200)
    args = ap.parse_args()
    print_machine()
    import trainlab.chat.kernels as K
    from trainlab.chat.decoding import rows_model
    from trainlab.chat.loading import load_chat_model
    from trainlab.engine.tracking import resolve_checkpoint

    served = K.SOURCE
    K.SOURCE = timed_source(served)
    try:
        kernels, note = K.load_kernels(args.kernels_root)
    finally:
        K.SOURCE = served
    print(note, flush=True)
    if kernels is None:
        raise SystemExit(1)
    runs, args.checkpoint = model_run(args, "pass-pieces-")
    model = load_chat_model(resolve_checkpoint(runs, "chat", args.checkpoint), torch.device("cpu")).model
    cfg = model.cfg
    L, H, hd, ctx = cfg.num_layers, cfg.nhead, cfg.d_model // cfg.nhead, cfg.context_len
    held = rows_model(model, kernels)
    g = torch.Generator().manual_seed(0)
    for rows in (int(r) for r in args.rows.split(",")):
        keys = torch.randn(L, max(8, rows), H, ctx, hd, generator=g) * 0.1  # (L, slots, H, ctx, hd)
        values = torch.randn(L, max(8, rows), H, ctx, hd, generator=g)
        tokens = torch.randint(0, cfg.vocab_size, (rows,), generator=g)
        idx, pos = torch.arange(rows), torch.full((rows,), ctx - 1)
        for _ in range(10):
            held.step_tokens(tokens, tokens, idx, pos, keys, values)
        kernels.timers()
        t = time.perf_counter()
        for _ in range(args.passes):
            held.step_tokens(tokens, tokens, idx, pos, keys, values)
        whole = (time.perf_counter() - t) / args.passes
        pieces = [s / args.passes for s in kernels.timers()]
        print(f"{rows} row(s) at position {ctx - 1}: a pass {1e3 * whole:.2f} ms; " + ", ".join(
            f"{name} {1e3 * s:.2f}" for name, s in zip(PIECES, pieces))
            + f"; the rest (embedding, final norm, head, the call) {1e3 * (whole - sum(pieces)):.2f}", flush=True)


if __name__ == "__main__":
    main()
