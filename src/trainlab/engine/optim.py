"""The optimizers a run can choose (``--optimizer``): AdamW, or Muon for hidden matrices.

Muon (Keller Jordan, 2024) keeps SGD momentum for each weight matrix of the network's
body and replaces the update by the nearest semi-orthogonal matrix (the matrix with
the same singular vectors and all singular values 1), found with a few Newton-Schulz
iterations. Every direction of the update then moves by the same amount, where Adam's
updates are dominated by a few large directions. On the char-level GPT here it reaches
a given val loss in far fewer steps than AdamW (docs/performance.md, "Time to quality").

What Muon does not suit (embeddings, the output head, norms, biases, learned latent
vectors) stays with AdamW, in the same optimizer object, so the engine's schedule,
loss scaler, checkpoints and rollbacks see one optimizer either way. The update is
scaled by 0.2 * sqrt(max(rows, cols)), which gives it the size of a typical AdamW
update (Liu et al. 2025, "Muon is scalable for LLM training"): one ``--lr`` and one
``--weight-decay`` serve both kinds of parameter.

torch ships ``torch.optim.Muon``, but it always runs the iterations in bfloat16, which on
a CPU without bf16 kernels is ~20x slower than the whole training step. Here they run in
the dtype the member trains in (``matmul_dtype``, which the engine sets from the
precision each step): float32, or bfloat16 where ``--precision`` chose bf16 because this
machine runs it faster. On an AMX Xeon that took the iterations of ``chat-90s`` from
21.8 ms to 7.4 ms a step (of ~130 ms), at no measured cost in loss (docs/chat.md, "Recipes
for a time budget").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# quintic Newton-Schulz coefficients tuned for fast convergence from a normalised start
# (they push singular values into roughly [0.7, 1.2] in 5 steps, which is all Muon needs)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with the singular vectors of ``g``: one
    (rows, cols) matrix, or a stack (k, rows, cols) of matrices done at once; iterated in
    ``dtype`` and returned in ``g``'s."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = x.mT  # so that x @ x.mT is the smaller of the two Gram matrices
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values <= 1, where the iteration converges
    stacked = x.dim() == 3
    x = x if stacked else x[None]  # (k, m, n), m <= n
    for _ in range(steps):
        gram = x @ x.mT  # (k, m, m)
        # x <- a x + (b gram + c gram^2) x, with the sums fused into the products
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # (k, m, m)
        x = torch.baddbmm(x, poly, x, beta=a)  # (k, m, n)
    x = x if stacked else x[0]
    return (x if wide else x.mT).to(g.dtype)


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weights Muon should own: those of ``nn.Linear`` layers, except the output layer
    (a module named ``head``) and any weight shared with an embedding."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [m.weight for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not _is_head(name) and id(m.weight) not in embedded
            and m.weight.requires_grad]


def _is_head(module_name: str) -> bool:
    """Whether a module is the output layer: by name (``head``, at any depth)."""
    return module_name.rsplit(".", 1)[-1] == "head"


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
        # the Newton-Schulz iterations' dtype: not state (it follows the member's precision,
        # which is checkpointed), so the engine sets it each step (``follow_precision``)
        self.matmul_dtype = torch.float32
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups may hold 2-D weights only")

    @torch.no_grad()
    def step(self, closure=None, skip: torch.Tensor | None = None):  # noqa: ANN001 - torch's signature
        """One update; ``skip`` (a 0-dim bool tensor on the weights' device, true: leave everything
        as it is) lets the device decide, with no wait for it (``masked_step``). One path
        either way: without ``skip`` every step is kept."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if first is None:
            return loss
        keep = torch.ones((), dtype=torch.bool, device=first.device) if skip is None else ~skip
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if wd:
                torch._foreach_mul_(params, _pick(keep, 1 - lr * wd, 1.0))
            if group["muon"]:
                self._muon(params, group, lr, keep)
            else:
                self._adamw(params, group, lr, keep)
        return loss

    def _muon(self, params: list[torch.Tensor], group: dict[str, Any], lr: float, keep: torch.Tensor) -> None:
        mu = group["momentum"]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        grads = [p.grad for p in params]  # zero where the step is skipped (masked_step)
        torch._foreach_mul_(bufs, _pick(keep, mu, 1.0))
        torch._foreach_add_(bufs, grads)
        looks = torch._foreach_add(grads, bufs, alpha=mu)  # Nesterov: look one step ahead
        # matrices of one shape are orthogonalised as one stack: a few large matmuls
        # instead of many small ones, which is most of the optimizer's time at d_model 128.
        # A tall matrix is iterated as its (wide) transpose, so it joins the stack of that
        # shape: an MLP's (4d, d) up and (d, 4d) down projections are one stack
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault((min(p.shape), max(p.shape)), []).append(i)
        for shape, idx in by_shape.items():
            wide = torch.stack([looks[i] if looks[i].shape == shape else looks[i].mT for i in idx])  # (k, m, n)
            updates = orthogonalize(wide, group["ns_steps"], self.matmul_dtype).unbind(0)
            updates = [u if params[i].shape == shape else u.mT for i, u in zip(idx, updates)]
            # a skipped step adds exact zeros: the update is finite, its grads were zeroed
            scale = _pick(keep, -lr * 0.2 * math.sqrt(max(shape)), 0.0)
            torch._foreach_add_([params[i] for i in idx], torch._foreach_mul(updates, scale))

    def _adamw(self, params: list[torch.Tensor], group: dict[str, Any], lr: float, keep: torch.Tensor) -> None:
        (b1, b2), eps = group["betas"], group["eps"]
        # the step counts are 0-dim tensors on the device (a skipped step does not count), the
        # bias corrections are computed from them there, and every change is a no-op (times 1,
        # plus 0) when the step is skipped
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            elif not torch.is_tensor(state["step"]) or state["step"].device != p.device:  # an int before; moved
                state["step"] = torch.as_tensor(float(state["step"]), dtype=torch.float32).to(p.device)
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, keep.float())
        torch._foreach_mul_(m, _pick(keep, b1, 1.0))
        torch._foreach_add_(m, grads, alpha=1 - b1)
        torch._foreach_mul_(v, _pick(keep, b2, 1.0))
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        counted = torch._foreach_maximum(steps, 1.0)  # a skip before any update: corrections of step 1, times 0
        bc1 = torch._foreach_pow(b1, counted)  # b1 ** step
        bc2 = torch._foreach_pow(b2, counted)
        torch._foreach_sub_(bc1, 1.0)  # b1 ** step - 1 = -(1 - b1 ** step): carries the update's minus sign
        torch._foreach_neg_(bc2)
        torch._foreach_add_(bc2, 1.0)
        torch._foreach_sqrt_(bc2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bc2)
        torch._foreach_add_(denom, eps)
        step_size = torch._foreach_reciprocal(bc1)  # -1 / (1 - b1 ** step)
        torch._foreach_mul_(step_size, _pick(keep, lr, 0.0))
        update = torch._foreach_div(m, denom)
        torch._foreach_mul_(update, step_size)
        torch._foreach_add_(params, update)


def _pick(keep: torch.Tensor, value: float, neutral: float) -> torch.Tensor:
    """``value`` where the step is kept, ``neutral`` (1 for a factor, 0 for a term) where it is
    skipped: a 0-dim tensor on the device, so the host never waits to choose."""
    return torch.where(keep, value, neutral)


def masked_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer``'s update, or none at all where ``skip`` (a 0-dim bool tensor on the weights'
    device) is true, decided on the device so that the host never waits to learn whether a
    step's loss was finite. Exact: a skipped step leaves every weight and every piece of
    optimizer state (moments, step counts) as it was, bit for bit. The caller zeroes the
    gradients of a skipped step first, so that nothing non-finite reaches the arithmetic.

    Muon (and its AdamW groups) multiplies each change by 1 and adds 0 (``Muon.step``);
    torch's fused AdamW takes the flag as ``found_inf``, as it does from a grad scaler (its
    kernel returns early and the step counts are put back); any other optimizer (none that
    ``make_optimizer`` builds) asks the host, which waits for the device."""
    if isinstance(optimizer, Muon):
        optimizer.step(skip=skip)
        return
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.float()  # type: ignore[attr-defined]  (read by torch's fused step)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        return
    if not skip.item():
        optimizer.step()


def follow_precision(optimizer: torch.optim.Optimizer, dtype: torch.dtype | None) -> None:
    """Let a Muon optimizer iterate in the training dtype: bfloat16 when the member trains in
    bf16 (chosen because this machine runs it faster), float32 otherwise (fp16 has too little
    range for the iterations' Gram matrices)."""
    if isinstance(optimizer, Muon):
        optimizer.matmul_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, betas: tuple[float, float],
                   momentum: float = 0.95, embed_lr: float | None = None, head_lr: float | None = None
                   ) -> torch.optim.Optimizer:
    """``name`` (one of train_config.OPTIMIZERS) over ``model``'s trainable parameters; weight decay
    on matrices only (not on biases, norms or other vectors).

    ``embed_lr`` and ``head_lr`` give the embeddings (every ``nn.Embedding``, and so a head tied
    to one) and an untied output layer (a module named ``head``) their own peak LR, in groups
    of their own that the schedule scales like the others (embeddings then without weight
    decay): a char model's 65-row tables see each row in nearly every batch and move fastest
    at a higher LR, its head at a lower one (docs/chat.md, "Recipes for a time budget"). Unset, the
    groups are laid out as before they existed, so an older checkpoint's optimizer state loads."""
    params = [p for p in model.parameters() if p.requires_grad]
    muon = {id(p) for p in hidden_matrices(model)} if name == "muon" else set()  # never an embedding or the head
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = {id(m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear) and _is_head(n)} - embedded
    own: list[dict[str, Any]] = []  # the groups of their own LR
    taken: set[int] = set()
    # embeddings not decayed: the decay would grow with the higher LR and pull the rows of
    # rare characters to zero; a head tied to an embedding is an embedding
    for ids, group_lr, decay in ((embedded, embed_lr, 0.0), (head, head_lr, weight_decay)):
        mine = [p for p in params if id(p) in ids] if group_lr is not None else []
        if mine:
            own.append({"params": mine, "lr": group_lr, "weight_decay": decay})
            taken |= ids
    rest = [p for p in params if id(p) not in muon and id(p) not in taken]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}, *own]
    if name == "adamw":
        # fused (one kernel for every weight) where torch has it: it also takes a device-side skip
        # flag (``masked_step``), which the foreach implementation does not
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)
    muon_group = {"params": [p for p in params if id(p) in muon], "weight_decay": weight_decay, "muon": True}
    return Muon([muon_group, *groups], lr=lr, betas=betas, momentum=momentum)
