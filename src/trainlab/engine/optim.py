"""The optimizers a run can choose (``--optimizer``): AdamW, or Muon for hidden matrices.

Muon (Keller Jordan, 2024) keeps SGD momentum for each weight matrix of the network's
body and replaces the update by the nearest semi-orthogonal matrix (the matrix with
the same singular vectors and all singular values 1), found with a few Newton-Schulz
iterations. Every direction of the update then moves by the same amount, where Adam's
updates are dominated by a few large directions. On the char-level GPT here it reaches
a given val loss in far fewer steps than AdamW (README, "Time to quality").

What Muon does not suit (embeddings, the output head, norms, biases, learned latent
vectors) stays with AdamW, in the same optimizer object, so the engine's schedule,
loss scaler, checkpoints and rollbacks see one optimizer either way. The update is
scaled by 0.2 * sqrt(max(rows, cols)), which gives it the size of a typical AdamW
update (Liu et al. 2025, "Muon is scalable for LLM training"): one ``--lr`` and one
``--weight-decay`` serve both kinds of parameter.

torch ships ``torch.optim.Muon``, but it runs the iterations in bfloat16, which on a
CPU without bf16 kernels is ~20x slower than the whole training step; here they run
in float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adamw", "muon")

# quintic Newton-Schulz coefficients tuned for fast convergence from a normalised start
# (they push singular values into roughly [0.7, 1.2] in 5 steps, which is all Muon needs)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with the singular vectors of ``g`` (2-D)."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T  # so that x @ x.T is the smaller of the two Gram matrices
    x = x / (x.norm() + 1e-7)  # singular values <= 1, where the iteration converges
    for _ in range(steps):
        gram = x @ x.T  # (m, m), m = min(rows, cols)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(g.dtype)


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weights Muon should own: those of ``nn.Linear`` layers, except the output layer
    (a module named ``head``) and any weight shared with an embedding."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [m.weight for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] != "head" and id(m.weight) not in embedded
            and m.weight.requires_grad]


class Muon(torch.optim.Optimizer):
    """Muon for param groups marked ``muon=True``, AdamW for the others.

    Each group has ``lr`` and ``weight_decay`` (decoupled, as AdamW's: ``p *= 1 - lr * wd``).
    Muon groups use ``momentum`` (Nesterov) and ``ns_steps``; the others ``betas`` and ``eps``.
    """

    def __init__(self, groups: Iterable[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8, momentum: float = 0.95, ns_steps: int = 5) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, ns_steps=ns_steps, weight_decay=0.0,
                        muon=False)
        super().__init__(list(groups), defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups may hold 2-D weights only")

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if wd:
                    p.mul_(1 - lr * wd)
                if group["muon"]:
                    self._muon(p, group, lr)
                else:
                    self._adamw(p, group, lr)
        return loss

    def _muon(self, p: torch.Tensor, group: dict[str, Any], lr: float) -> None:
        state, mu = self.state[p], group["momentum"]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.mul_(mu).add_(p.grad)
        update = orthogonalize(p.grad.add(buf, alpha=mu), group["ns_steps"])  # Nesterov: look one step ahead
        p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))

    def _adamw(self, p: torch.Tensor, group: dict[str, Any], lr: float) -> None:
        state = self.state[p]
        (b1, b2), g = group["betas"], p.grad
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        state["exp_avg"].lerp_(g, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**t)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, betas: tuple[float, float],
                   momentum: float = 0.95) -> torch.optim.Optimizer:
    """``name`` (one of OPTIMIZERS) over ``model``'s trainable parameters; weight decay
    on matrices only (not on biases, norms or other vectors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    muon = {id(p) for p in hidden_matrices(model)} if name == "muon" else set()
    groups = [{"params": [p for p in params if id(p) not in muon and p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    muon_group = {"params": [p for p in params if id(p) in muon], "weight_decay": weight_decay, "muon": True}
    return Muon([muon_group, *groups], lr=lr, betas=betas, momentum=momentum)
