"""What a run is made of while it trains, and how it goes into and comes out of a checkpoint:
each member (model, optimizer, schedule, precision, micro-batching, loss trend, counters),
the loop's own bookkeeping, the RNG states, and the summary a report is made from.

A checkpoint holds every piece of this, so a resumed run continues as if it had never
stopped (``save`` / ``restore``)."""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from trainlab.engine.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from trainlab.engine.distributed import Dist, gather
from trainlab.engine.memory import MicroBatches
from trainlab.engine.monitor import LossTrend, Plateau
from trainlab.engine.optim import make_optimizer
from trainlab.engine.precision import Precision
from trainlab.engine.task import Task
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
    ddp: nn.Module | None = None  # what the training forward goes through: DDP's wrapper, or the model

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.ddp is None:
            self.ddp = self.model

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

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
                         "scheduler": self.scheduler.state_dict(), "scaler": self.precision.scaler.state_dict(),
                         "step": self.step}

    def rollback(self) -> None:
        snap = self.snapshot
        self.model.load_state_dict(snap["model"])
        # a copy: the optimizer adopts the tensors it is given, and would then update the snapshot
        self.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
        self.scheduler.load_state_dict(snap["scheduler"])
        if snap["scaler"]:
            self.precision.scaler.load_state_dict(snap["scaler"])
        self.step = snap["step"]
        self.set_lr()  # a plateau cut made since the snapshot still holds

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



def make_member(name: str, model: nn.Module, cfg: TrainConfig, device: torch.device | None = None) -> Member:
    """``model`` (already on ``device``) with its optimizer, the warmup/cosine schedule scaled by
    plateau cuts, and its precision, micro-batching and loss-trend state."""
    device = device or torch.device("cpu")
    opt = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.muon_momentum)
    plateau = Plateau(cfg.plateau_patience, cfg.plateau_factor, cfg.plateau_min_lr)
    schedule = lr_lambda(cfg)
    return Member(name, model, opt, LambdaLR(opt, lambda step: schedule(step) * plateau.scale),
                  Precision(cfg.precision, device), MicroBatches(cfg.recover_after),
                  LossTrend(cfg.loss_window, cfg.spike_sigma), plateau)



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"],
                  "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



@dataclass
class LoopState:
    """The loop's own bookkeeping that a resume must continue, saved in trainer.pt."""

    step: int = 0
    # per member, sums since the last log step of the finite losses and stats, and their count "n"
    acc: dict[str, dict[str, float]] = field(default_factory=dict)
    acc_steps: int = 0
    eta: dict[str, Any] = field(default_factory=dict)  # Eta.state_dict() at the last save
    best_score: float | None = None

    def state_dict(self) -> dict[str, Any]:
        acc = {m: {k: _scalar(v) for k, v in d.items()} for m, d in self.acc.items()}
        return {"step": self.step, "acc": acc, "acc_steps": self.acc_steps, "eta": self.eta,
                "best_score": self.best_score}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "LoopState":
        acc = {m: dict(d) for m, d in state.get("acc", {}).items()}
        for d in acc.values():  # checkpoints written before "n" existed: every step counted
            d.setdefault("n", int(state.get("acc_steps", 0)))
        eta = state.get("eta") or {"times": state.get("step_times", [])}
        return cls(int(state["step"]), acc, int(state.get("acc_steps", 0)), eta, state.get("best_score"))



def save(run: Run, task: Task, members: list[Member], state: LoopState, cfg: TrainConfig, config: dict[str, Any],
         best: dict[str, Any] | None = None, d: Dist = Dist()) -> None:
    """One checkpoint of everything; ``best`` set: the best-so-far copy in checkpoints/best.
    Under torchrun every rank calls it (each one's RNG state is kept); rank 0 writes."""
    rngs = gather(rng_state(), d)
    if not d.main:
        return
    trainer = {"step": state.step, "rng": rngs[0], "task": task.state_dict(), "loop": state.state_dict()}
    if d.active:
        trainer["rng_ranks"] = rngs
    tensors: dict[str, Any] = {"trainer.pt": trainer}
    texts = {"config.json": json.dumps(config, indent=2)}
    texts.update(task.checkpoint_texts())
    for m in members:
        tensors[f"{m.name}/model.pt"] = m.model.state_dict()
        tensors[f"{m.name}/train_state.pt"] = m.state_dict()
        if m.snapshot is not None:  # --on-spike rollback: a resume must roll back to the same state
            tensors[f"{m.name}/snapshot.pt"] = m.snapshot
        texts.update({f"{m.name}/{k}": v for k, v in task.member_texts(m.name).items()})
    if best is None:
        save_checkpoint(run.checkpoints, state.step, tensors, texts, task=task.name, keep=cfg.keep_checkpoints)
    else:
        save_checkpoint(run.checkpoints / "best", state.step, tensors, texts, task=task.name, keep=1,
                        extra_meta={"best": best})


def check_compatible(ckpt: Checkpoint, task: Task, member_names: list[str]) -> None:
    """Refuse a checkpoint of another task, vocabulary or set of members, before anything is written."""
    if ckpt.meta.get("task") != task.name:
        raise CheckpointError(f"{ckpt.path} belongs to task {ckpt.meta.get('task')!r}, not {task.name!r}")
    for name, text in task.checkpoint_texts().items():
        if name.endswith(".json") and (name not in ckpt.sums or ckpt.json(name) != json.loads(text)):
            raise CheckpointError(f"{ckpt.path}: its {name} differs from this run's now (another vocabulary, "
                                  f"format or corpus); refusing to continue from it")
    names = {n.split("/")[0] for n in ckpt.sums if n.endswith("/model.pt")}
    if names != set(member_names):
        raise CheckpointError(f"{ckpt.path}: holds members {sorted(names)}, this task trains {sorted(member_names)}")


def restore(ckpt: Checkpoint, task: Task, members: list[Member], device: torch.device, d: Dist = Dist()
            ) -> LoopState:
    """Load every piece of state from ``ckpt``; returns the loop state to continue from.
    Each rank takes back its own RNG state when the number of processes is the one saved;
    otherwise ranks past 0 keep the fresh seeding of their rank (only dropout differs)."""
    check_compatible(ckpt, task, [m.name for m in members])
    for m in members:
        ckpt.load_weights(m.model, f"{m.name}/model.pt", map_location=device)
        m.load_state_dict(ckpt.tensors(f"{m.name}/train_state.pt", map_location=device))
        if f"{m.name}/snapshot.pt" in ckpt.sums:
            m.snapshot = ckpt.tensors(f"{m.name}/snapshot.pt", map_location=device)
    trainer = ckpt.tensors("trainer.pt")
    task.load_state_dict(trainer["task"])
    ranks = trainer.get("rng_ranks") or [trainer["rng"]]
    if len(ranks) == d.world:
        set_rng_state(ranks[d.rank])
    elif d.main:
        set_rng_state(trainer["rng"])
    return LoopState.from_state_dict(trainer.get("loop", {"step": trainer["step"]}))


def _scalar(x: torch.Tensor | float) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _better(score: float, best: float | None, mode: str) -> bool:
    if math.isnan(score):
        return False
    return best is None or (score > best if mode == "max" else score < best)


