"""An exponential moving average of a model's weights (``--ema DECAY``): the weights a run's
evaluations, samples, report and checkpoints' ``model.pt`` hold, while the optimizer goes on
training its own.

Why: at the 2,020 steps that 20 AVX2 minutes afford, the last weights of ``chat-1min-dropout``
sit wherever the last few hundred noisy updates left them, and five seeds ended 0.006 apart.
Their average over roughly the last ``1 / (1 - DECAY)`` steps (0.99: about 100) scored lower on
the whole val span than the last weights in each of five seeds, by 0.0033-0.0064
(results/auto/README.md, "An average of the weights"), a cosine schedule's decay notwithstanding.

The average starts at the first step and follows the weights closely while it is young: its
decay at update n is ``min(DECAY, (1 + n) / (10 + n))``, so an early evaluation scores weights
of the last few steps rather than the initialisation's. It is kept in the weights' own dtype
(fp32 on every path here; autocast leaves the parameters in fp32), updated in place after every
optimizer step (one fused lerp over the parameters: 0.12 ms for ``chat-1min-dropout``'s 1.7M,
whose fp32 step takes 137 ms on a 2-core EPYC), and saved with its update count, so a resumed
run goes on with the same average, bit for bit.

torch.optim.swa_utils.AveragedModel does the averaging, but keeps ``n_averaged`` as a buffer of
the copy and wraps the module (its state dict's names gain ``module.``), which would change what
``model.pt`` holds; the update itself is one line of ``torch._foreach_lerp_``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

WARM = 10  # the decay's ramp: (1 + n) / (WARM + n), as timm's ModelEmaV3 and others ramp theirs


def ramped_decay(decay: float, n: int) -> float:
    """The decay of an average's ``n``-th update (from 1): ``decay``, lowered while the average is young."""
    return min(decay, (1 + n) / (WARM + n))


class WeightAverage:
    """The moving average of ``model``'s weights, held in a copy of the model (``self.model``),
    always in eval mode and never trained."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        # the same order on both sides: a deep copy keeps the parameters' order and their ties
        self._source = list(model.parameters())
        self._target = list(self.model.parameters())
        self._source_buffers = list(model.buffers())
        self._target_buffers = list(self.model.buffers())

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return ramped_decay(self.decay, self.updates + 1)

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model's weights as they are now (after a step)."""
        weight = 1.0 - self.current_decay()
        self.updates += 1
        torch._foreach_lerp_(self._target, self._source, weight)
        for a, b in zip(self._target_buffers, self._source_buffers):  # buffers are not averaged: they follow
            a.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the averaged weights themselves (``model.pt``)."""
        return {"decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
