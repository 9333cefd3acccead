"""What the loop needs from a task, and what a task gives back: the contract every task
(multiply/, chat/) implements. The loop never imports a task; a task imports this."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from trainlab.engine.member import Summary
    from trainlab.engine.tracking import Run

@dataclass
class Evaluation:
    """What a task's evaluation (or sample) of one member returns."""

    metrics: dict[str, float]
    lines: list[str] = field(default_factory=list)  # a few examples worth printing (mistakes)
    text: str = ""  # markdown for TensorBoard's text tab (samples)


class StepLoss(NamedTuple):
    """What a task's ``loss`` returns for one batch (or micro-batch).

    ``loss`` is a weighted mean over the batch, and ``weight`` its denominator (the sum
    of the weights; None: the number of examples). Micro-batches are combined as
    sum(loss * weight) / sum(weight), so a split batch gives the update the whole batch
    would have. ``stats`` are detached tensors, logged as means over the log interval."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = {}
    weight: torch.Tensor | float | None = None


class Task(Protocol):
    """What the loop needs from a task; see multiply/task.py for a full example.

    Evaluation metrics named ``val_loss`` drive the plateau LR cuts. ``evaluate`` runs
    batches of at most ``batch_limit`` examples when it is given (set after an
    evaluation ran out of memory), its own sizes otherwise; the metrics must not
    depend on it.

    Optional, found with ``getattr``: ``evaluate_part(member, model, step, batch_limit,
    part) -> float`` runs about ``part`` of what ``evaluate`` runs, in the same batch sizes,
    and returns the share of it that ran (a time budget times it instead of a whole
    evaluation); ``report_part(models, part) -> float``, the same for the report's own
    scoring (models: name -> module, as the report scores them); where a task has no
    ``report_part``, ``report_cost() -> float`` (that scoring in evaluations) and
    ``report_in_fp32`` (True where the report scores in fp32 whatever the run trained in)."""

    name: str  # folder under runs_dir, and the task id stored in checkpoints
    best_metric: tuple[str, str]  # (evaluation metric, "max"|"min"): picks the best checkpoint
    member_names: list[str]  # the keys build_models() will return

    def build_models(self) -> dict[str, nn.Module]: ...
    def batch(self, step: int) -> dict[str, torch.Tensor]: ...
    def loss(self, member: str, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> StepLoss: ...
    def scalars(self, step: int) -> dict[str, float]: ...
    def evaluate(self, member: str, model: nn.Module, step: int, batch_limit: int | None = None) -> Evaluation: ...
    def sample(self, member: str, model: nn.Module, step: int) -> Evaluation: ...
    def checkpoint_texts(self) -> dict[str, str]: ...
    def member_texts(self, member: str) -> dict[str, str]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def report(self, run: Run, summary: "Summary") -> None: ...
