"""One model being trained (``Member``): its optimizer, schedule, precision, micro-batching,
loss trend and counters; and the ``Summary`` a task's report is made from.

Apart from ``state.py`` so that the Task contract (``task.py``) can name the summary it
receives without importing the loop's save/restore machinery, which itself needs the
contract: one arrow each way would be a cycle."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from trainlab.engine.average import WeightAverage
from trainlab.engine.memory import MicroBatches
from trainlab.engine.monitor import LossTrend, Plateau
from trainlab.engine.optim import make_optimizer
from trainlab.engine.precision import Precision
from trainlab.engine.tracking import Run
from trainlab.engine.train_config import TrainConfig, lr_lambda


@dataclass
class Health:
    """A member's count of the steps that did not go as planned."""

    skipped_nonfinite: int = 0
    skipped_spikes: int = 0
    rollbacks: int = 0
    nonfinite_run: int = 0  # non-finite steps in a row, up to now

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k, v in state.items():
            setattr(self, k, int(v))


@dataclass
class Member:
    """One model being trained: its optimizer, schedule, precision and bookkeeping."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    precision: Precision
    micro: MicroBatches
    trend: LossTrend
    plateau: Plateau
    health: Health = field(default_factory=Health)
    step: int = 0
    train_seconds: float = 0.0
    examples: int = 0
    losses: list[list[float]] = field(default_factory=list)  # [step, loss] at log steps
    evals: list[dict[str, float]] = field(default_factory=list)  # metrics with "step"
    snapshot: dict[str, Any] | None = None  # the last good state, kept in memory for --on-spike rollback
    params: list[nn.Parameter] = field(default_factory=list)  # walking the modules for them costs ~1 ms a step
    pending: list[Any] = field(default_factory=list)  # steps the host has not read yet (engine/step.py, settle)
    ddp: nn.Module | None = None  # what the training forward goes through: DDP's wrapper, or the model
    average: WeightAverage | None = None  # --ema: the moving average of the weights, which is what is scored

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.ddp is None:
            self.ddp = self.model

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def scored(self) -> nn.Module:
        """The weights a run shows and keeps: what evaluations, samples and the report score and
        a checkpoint's ``model.pt`` holds. The moving average of the weights under ``--ema``,
        else the weights the optimizer trains."""
        return self.model if self.average is None else self.average.model

    @contextlib.contextmanager
    def scoring(self) -> Iterator[nn.Module]:
        """``scored`` in eval mode for the duration; after it, the trained model is in train mode
        again (the average is never trained, and stays in eval mode)."""
        model = self.scored
        model.eval()
        try:
            yield model
        finally:
            if model is self.model:
                model.train()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def set_lr(self) -> None:
        """The schedule's LR for the current step, now (after a plateau cut or a rollback)."""
        s = self.scheduler
        for group, base in zip(self.optimizer.param_groups, s.base_lrs):
            group["lr"] = base * s.lr_lambdas[0](s.last_epoch)

    def take_snapshot(self) -> None:
        self.snapshot = {"model": copy.deepcopy(self.model.state_dict()),
                         "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                         "scaler": self.precision.scaler.state_dict(),
                         "step": self.step}
        if self.average is not None:
            self.snapshot["average"] = {"model": copy.deepcopy(self.average.model.state_dict()),
                                        **self.average.state_dict()}

    def rollback(self) -> None:
        snap = self.snapshot
        self.model.load_state_dict(snap["model"])
        # a copy: the optimizer adopts the tensors it is given, and would then update the snapshot
        self.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
        # the schedule is left where it is: it follows the batches, which are not given back
        if snap["scaler"]:
            self.precision.scaler.load_state_dict(snap["scaler"])
        self.step = snap["step"]
        if self.average is not None and "average" in snap:
            self.average.model.load_state_dict(snap["average"]["model"])
            self.average.load_state_dict(snap["average"])
        self.set_lr()

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "examples": self.examples,
            "losses": self.losses,
            "evals": self.evals,
            "precision": self.precision.state_dict(),
            "micro_batches": self.micro.state_dict(),
            "trend": self.trend.state_dict(),
            "plateau": self.plateau.state_dict(),
            "health": self.health.state_dict(),
            **({"average": self.average.state_dict()} if self.average is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.train_seconds = float(state["train_seconds"])
        self.examples = int(state["examples"])
        self.losses = [list(x) for x in state["losses"]]
        self.evals = [dict(x) for x in state["evals"]]
        # checkpoints written before these existed resume with them fresh
        for name in ("precision", "trend", "plateau", "health"):
            if name in state:
                getattr(self, name).load_state_dict(state[name])
        if "micro_batches" in state:
            self.micro.load_state_dict(state["micro_batches"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])



@dataclass
class Summary:
    """What the report is made from."""

    run: Run
    members: list[Member]
    step: int
    wall_seconds: float
    interrupted: bool
    config: dict[str, Any]
    stop_signal: int | None = None  # the signal that stopped it, if one did
    stop_reason: str = ""  # why it stopped early: SIGINT, SIGTERM, pruned, interrupt (a planned fault), ...
    budget: dict[str, Any] | None = None  # a --minutes run: its budget, fits and time spent so far



def make_member(name: str, model: nn.Module, cfg: TrainConfig, device: torch.device | None = None) -> Member:
    """``model`` (already on ``device``) with its optimizer, the warmup/cosine schedule scaled by
    plateau cuts, and its precision, micro-batching and loss-trend state."""
    device = device or torch.device("cpu")
    opt = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.muon_momentum,
                         cfg.embed_lr, cfg.head_lr)
    plateau = Plateau(cfg.plateau_patience, cfg.plateau_factor, cfg.plateau_min_lr)
    schedule = lr_lambda(cfg)
    return Member(name, model, opt, LambdaLR(opt, lambda step: schedule(step) * plateau.scale),
                  Precision(cfg.precision, device), MicroBatches(cfg.recover_after),
                  LossTrend(cfg.loss_window, cfg.spike_sigma), plateau,
                  average=WeightAverage(model, cfg.ema) if cfg.ema else None)
