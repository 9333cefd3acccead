"""Dropout with a mask that costs a CPU a fifth of PyTorch's.

On a CPU, ``F.dropout`` draws one random number per element (``bernoulli_``, through
PyTorch's Mersenne Twister) and took a fifth of an fp32 training step of ``chat-20min`` and
a quarter of a bf16 one (``torch.profiler``, a 2-core AVX-512-BF16 EPYC). Here a mask element
takes 16 random bits: one 64-bit draw gives four elements, and the keep decision is
``bits >= round(p * 2**16)``, so ``p`` is honoured to 1/65536. The bits still come from
torch's default generator, so seeding, checkpointed RNG state and a retried pass draw the
same masks as before: a resumed run stays bit-exact. ``benchmarks/dropout_mask.py`` prints
both side by side.

Elsewhere (a GPU, where PyTorch's dropout is one fused kernel, or inside ``torch.compile``,
which fuses its own random numbers into the surrounding kernel) this is ``F.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BITS = 16  # random bits per element: p is kept to 1/65536


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype, device: torch.device | str = "cpu"
              ) -> torch.Tensor:
    """A dropout mask of ``shape``: each element 0 with probability ``p`` (rounded to a multiple
    of 2**-16), else ``1 / (1 - p)``, in ``dtype``."""
    n = 1
    for s in shape:
        n *= s
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)  # all 64 bits random
    bits = words.view(torch.int16)[:n].view(shape).to(torch.float32)  # (shape) integers in [-32768, 32767]
    # an element is dropped when its bits are among the lowest round(p * 65536) values, i.e. at
    # most `last_dropped`; clamp(bits - last_dropped, 0, 1) is then exactly 0 (dropped) or 1 (kept)
    last_dropped = -32768 + round(p * 2**BITS) - 1
    mask = bits.sub_(last_dropped).clamp_(0, 1).mul_(1.0 / (1.0 - p))  # (shape)
    return mask if dtype == torch.float32 else mask.to(dtype)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with the cheaper mask where it is cheaper (a CPU, eager)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling() or not x.is_floating_point():
        return F.dropout(x, p, training)
    return x * keep_mask(x.shape, p, x.dtype, x.device)  # autograd keeps the mask for the backward


class Dropout(nn.Module):
    """``nn.Dropout`` through ``dropout`` above: no parameters, so checkpoints are unchanged."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
