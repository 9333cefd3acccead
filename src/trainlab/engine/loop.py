"""engine.train(): the one training loop every task runs on.

Each step: the task gives the batch for that step; every member (a model with its
own optimizer, LR schedule and step count) does forward, backward and update on
that same batch; then log, maybe evaluate, maybe save. Training stops exactly at
``max_steps`` optimizer updates, or on Ctrl+C at the next step boundary (so no
member is ever left half a step ahead), and then saves and reports.

Batches are a pure function of (seed, step), so the data position of a run is its
step count and a resumed run reads exactly the batches it would have read.

A member's step is guarded: its forward pass runs under the precision's autocast, an
out-of-memory is retried in more micro-batches (``engine/memory.py``), and a loss or
gradient that is not finite, or a loss spike with ``--on-spike skip|rollback``, leaves
the weights, optimizer and schedule untouched (the batch is still consumed, and the
step still counts toward ``max_steps``). Such steps are counted and logged.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from trainlab.config import ConfigError, in_range, non_negative, one_of, positive
from trainlab.engine import faults
from trainlab.engine.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from trainlab.engine.device import resolve_device, synchronize
from trainlab.engine.distributed import Dist, all_sum, broadcast, current, device_for, gather, shard, wrap
from trainlab.engine.memory import (MicroBatches, fastest, free_memory, is_out_of_memory, memory_figures,
                                   micro_batch_counts, split_batch)
from trainlab.engine.monitor import Eta, LossTrend, Plateau, due, format_duration
from trainlab.engine.optim import OPTIMIZERS, make_optimizer
from trainlab.engine.precision import BF16_MARGIN, PRECISIONS, Precision
from trainlab.engine.tracking import Run

SPIKE_ACTIONS = ("log", "skip", "rollback")


@dataclass
class TrainConfig:
    """Settings of the loop itself, shared by every task."""

    max_steps: int | None = field(default=None, metadata={"help": "optimizer updates to run; none: until Ctrl+C"})
    batch_size: int = field(default=128, metadata={"help": "examples per optimizer update"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final LR of the cosine decay, as a fraction of --lr"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    lr_decay_steps: int | None = field(
        default=None, metadata={"help": "end of the cosine decay; default --max-steps (constant LR if neither)"}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "decoupled weight decay on matrices (either optimizer)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw|muon (muon: orthogonalised momentum for the hidden "
                                                              "matrices, AdamW for the rest; same --lr scale)"})
    muon_momentum: float = field(default=0.95, metadata={"help": "Muon's Nesterov momentum"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.98, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip gradient norm to this; 0 disables"})
    precision: str = field(default="auto", metadata={"help": "auto|fp32|bf16|fp16 (auto: bf16 on GPUs that have it, "
                                                             "fp16 with loss scaling on older ones; on CPUs with native "
                                                             "bf16, fp32 and bf16 are timed on the first batch and bf16 "
                                                             "kept only if 5% faster; fp32 on other CPUs)"})
    max_nonfinite: int = field(default=20, metadata={"help": "non-finite steps in a row (each skipped) before "
                                                             "falling back to fp32; in fp32, before stopping"})
    recover_after: int = field(default=200, metadata={"help": "steps without out-of-memory before trying "
                                                              "larger micro-batches again"})
    loss_window: int = field(default=100, metadata={"help": "steps in the loss moving average and spike window"})
    spike_sigma: float = field(default=6.0, metadata={"help": "a loss this many standard deviations above the "
                                                              "window mean is a spike"})
    on_spike: str = field(default="log", metadata={"help": "log|skip|rollback: on a spike, only count it, skip the "
                                                           "update, or also restore the last good state"})
    plateau_patience: int = field(default=5, metadata={"help": "evaluations without val loss improving before the "
                                                               "LR is cut; 0: never cut"})
    plateau_factor: float = field(default=0.5, metadata={"help": "LR multiplier of a plateau cut"})
    plateau_min_lr: float = field(default=1e-5, metadata={"help": "plateau cuts never take the LR below this"})
    compile: bool = field(default=False, metadata={"help": "run the training forward pass through torch.compile "
                                                          "(slow to start; on these CPUs it gained 0-3%)"})
    micro_batch: str = field(default="off", metadata={"help": "examples per forward pass on each process: off (the "
                                                              "whole batch), N, or auto (the fastest, timed at the "
                                                              "start); the update is the whole batch's either way"})
    eval_every: int = field(default=500, metadata={"help": "evaluate every N steps (and at the end)"})
    save_every: int = field(default=1000, metadata={"help": "checkpoint every N steps (and at the end)"})
    save_every_minutes: float | None = field(
        default=None, metadata={"help": "also checkpoint when this many minutes passed since the last save"})
    log_every: int = field(default=10, metadata={"help": "log scalars every N steps"})
    sample_every: int = field(default=0, metadata={"help": "show a sample of each member every N steps "
                                                           "(and at the end); 0: never"})
    keep_checkpoints: int = field(default=3, metadata={"help": "newest checkpoints kept (the best one is kept apart)"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and dropout"})
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda|mps"})
    runs_dir: str = field(default="runs", metadata={"help": "root folder of all runs"})
    run_name: str = field(default="", metadata={"help": "run id to create (default: a timestamp)"})
    tag: str = field(default="", metadata={"help": "tag stored with the run ('test' marks test runs)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        positive("max_steps", self.max_steps, allow_none=True)
        positive("lr_decay_steps", self.lr_decay_steps, allow_none=True)
        positive("save_every_minutes", self.save_every_minutes, allow_none=True)
        if self.lr_decay_steps is None and self.max_steps is not None:
            # fixed when the run starts and saved with it: a resume that extends
            # --max-steps keeps the schedule it started with instead of jumping the LR
            self.lr_decay_steps = self.max_steps
        for name in ("batch_size", "lr", "eval_every", "save_every", "log_every", "max_nonfinite", "recover_after",
                     "spike_sigma"):
            positive(name, getattr(self, name))
        for name in ("warmup_steps", "weight_decay", "grad_clip", "keep_checkpoints", "sample_every",
                     "plateau_patience", "plateau_min_lr"):
            non_negative(name, getattr(self, name))
        in_range("min_lr_ratio", self.min_lr_ratio, 0, 1)
        if self.loss_window < 2:
            raise ConfigError("loss_window", f"must be at least 2, got {self.loss_window}")
        in_range("plateau_factor", self.plateau_factor, 0, 1, low_open=True, high_open=True)
        one_of("precision", self.precision, PRECISIONS)
        one_of("on_spike", self.on_spike, SPIKE_ACTIONS)
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        in_range("muon_momentum", self.muon_momentum, 0, 1, high_open=True)
        self.micro_batch = str(self.micro_batch)
        if self.micro_batch not in ("off", "auto") and not (self.micro_batch.isdigit() and int(self.micro_batch) > 0):
            raise ConfigError("micro_batch", f"must be off, auto or a positive integer, got {self.micro_batch!r}")
        for name in ("beta1", "beta2"):
            in_range(name, getattr(self, name), 0, 1, high_open=True)


# Settings a resumed run may change: how long to train, how often to log, save and
# evaluate, and where. Everything else (model, data, optimizer, seed, batch) is the
# run's identity and comes from the checkpoint.
# The robustness settings may change too: a run resumed on another device, or after an
# out-of-memory, must be able to pick another precision or spike policy.
RESUMABLE_CHANGES = frozenset({"max_steps", "lr_decay_steps", "eval_every", "save_every", "save_every_minutes",
                               "log_every", "sample_every", "keep_checkpoints", "device", "runs_dir", "progress",
                               "precision", "max_nonfinite", "recover_after", "loss_window", "spike_sigma",
                               "on_spike", "plateau_patience", "plateau_factor", "plateau_min_lr", "micro_batch", "compile"})


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
    depend on it."""

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


class TrainingError(RuntimeError):
    """Training cannot go on (out of memory one example at a time, a diverged loss)."""


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


def lr_lambda(cfg: TrainConfig):
    """Linear warmup to 1, then cosine down to ``min_lr_ratio`` at ``lr_decay_steps``."""
    horizon = cfg.lr_decay_steps or cfg.max_steps

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if horizon is None:
            return 1.0
        t = min(1.0, (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return f


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


class _StopOnInterrupt:
    """First Ctrl+C asks the loop to stop at the next step boundary; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_StopOnInterrupt":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave SIGINT alone
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl+C again to abort without saving)", flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


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


# -- one member's step ---------------------------------------------------------------------
class StepResult(NamedTuple):
    loss: float  # the whole batch's loss (nan or inf when it was not finite)
    grad_norm: float  # before clipping
    stats: dict[str, torch.Tensor]


def _rows(batch: dict[str, torch.Tensor]) -> int:
    return int(next(iter(batch.values())).shape[0])


class _AgreedOutOfMemory(MemoryError):
    """Another rank ran out of memory in this step: every rank retries, as one."""


def _close_ddp_round(m: Member, task: Task, batch: dict[str, torch.Tensor], step: int) -> None:
    """After an out-of-memory agreed on, leave every rank's DDP idle and alike: a rank whose
    last forward pass succeeded is waiting for a backward pass that all-reduces, the rank
    that failed is not. Every rank runs one such round on a single example with a zero
    loss, and the gradients are thrown away."""
    m.optimizer.zero_grad(set_to_none=True)
    one = {k: v[:1] for k, v in batch.items()}
    with m.precision.autocast():
        out = task.loss(m.name, m.ddp, one, step)
    (out.loss * 0.0).backward()
    m.optimizer.zero_grad(set_to_none=True)


def forward_backward(m: Member, task: Task, batch: dict[str, torch.Tensor], step: int, n_global: int,
                     planned: dict[str, set[int]], first_try: bool, d: Dist, device: torch.device
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Gradients of the whole global batch (``n_global`` examples) from this rank's slice
    ``batch``, in ``m.micro.count`` micro-batches; returns the global batch's loss (detached)
    and this rank's share of the stats.

    Micro-batch i is back-propagated as loss_i * w_i / ref, where w_i is its loss weight and
    ref = n_global / world is known to every rank in advance; DDP averages over ranks, so the
    gradient is sum(w_i g_i) * world / (n_global * world) and one multiplication by
    n_global / sum(w_i) (summed over ranks) makes it the whole batch's weighted mean. With
    unweighted losses that factor is exactly 1 and is skipped."""
    m.optimizer.zero_grad(set_to_none=True)
    scaler = m.precision.scaler
    chunks = split_batch(batch, m.micro.count)
    plain = len(chunks) == 1 and not d.active  # the common case: one backward, nothing to weigh or agree on
    reference = n_global / d.world
    total: torch.Tensor | float = 0.0
    weight_sum: torch.Tensor | float = 0.0
    stats: dict[str, torch.Tensor] = {}
    last: torch.Tensor | None = None  # the last micro-batch's scaled loss: its backward syncs the ranks
    oom: BaseException | None = None
    weighted = False
    for i, chunk in enumerate(chunks):
        n = _rows(chunk)
        final = i == len(chunks) - 1
        try:
            faults.raise_if_out_of_memory(planned, step, n, first_try)
            # DDP decides in forward whether the backward all-reduces: only the last one does
            with (m.ddp.no_sync() if d.active and not final else contextlib.nullcontext()):
                with m.precision.autocast():
                    out = task.loss(m.name, m.ddp, chunk, step)
                loss = faults.poison_loss(planned, step, out.loss)
                if plain:
                    scaler.scale(loss).backward()
                    faults.poison_grads(planned, step, m.model)
                    return loss.detach(), out.stats
                w = n if out.weight is None else out.weight.detach()
                weighted = weighted or out.weight is not None
                scaled = scaler.scale(loss * (w / reference))
                if final:
                    last = scaled
                else:
                    scaled.backward()
        except Exception as e:  # noqa: BLE001 (only out-of-memory is handled; the rest re-raised)
            if not is_out_of_memory(e):
                raise
            oom = e
            break
        total = total + loss.detach() * w
        weight_sum = weight_sum + w
        for k, v in out.stats.items():
            stats[k] = stats.get(k, 0.0) + v * (n / n_global)
    if d.active:  # every rank learns whether one ran out of memory, and the batch's loss and weight
        agreed = all_sum(torch.cat([torch.as_tensor(x, device=device).double().reshape(1)
                                    for x in (float(oom is not None), weight_sum, total)]), device)
        if oom is None and agreed[0] > 0:
            oom = _AgreedOutOfMemory("another rank ran out of memory")
        total, weight_sum = agreed[2], agreed[1]
        if oom is not None:
            last = loss = out = None  # noqa: F841 (frees the graph before the round below)
            _close_ddp_round(m, task, batch, step)
    if oom is not None:
        raise oom
    try:
        last.backward()
    except Exception as e:  # noqa: BLE001
        if d.active and is_out_of_memory(e):
            # the other ranks are inside the gradient all-reduce by now; there is no agreeing any more
            raise TrainingError(f"{m.name}: out of memory on rank {d.rank} in the backward pass that all-reduces "
                                f"the gradients (step {step + 1}); resume with a smaller --micro-batch") from None
        raise
    if weighted:  # then the weights are tensors
        correction = (n_global / weight_sum).float()
        for p in m.params:
            if p.grad is not None:
                p.grad.mul_(correction)
    faults.poison_grads(planned, step, m.model)
    return (total / weight_sum).float(), stats


def member_step(m: Member, task: Task, batch: dict[str, torch.Tensor], step: int, cfg: TrainConfig,
                planned: dict[str, set[int]], device: torch.device, echo, n_global: int, d: Dist = Dist()
                ) -> StepResult:
    """Forward, backward and (unless it must not happen) the update of one member on this
    rank's slice ``batch`` of a global batch of ``n_global``; what went wrong, if anything,
    is said through ``echo``."""
    n_local = _rows(batch)
    rng = torch.get_rng_state()  # a retry after an out-of-memory draws the same dropout masks
    first_try = True
    while True:
        failed = False
        try:
            loss, stats = forward_backward(m, task, batch, step, n_global, planned, first_try, d, device)
        except Exception as e:  # noqa: BLE001 (only out-of-memory is handled; the rest re-raised)
            if not is_out_of_memory(e):
                raise
            failed = True
        if not failed:
            break
        # out of the except block, so the failed attempt's tensors can be freed
        m.optimizer.zero_grad(set_to_none=True)
        free_memory(device)
        try:
            m.micro.on_oom(n_local, step)
        except RuntimeError as e:
            raise TrainingError(f"{m.name}: {e}") from None
        where = f" on one of the {d.world} processes; each one's slice" if d.active else "; the batch"
        echo(f"[step {step + 1}] {m.name}: out of memory{where} of {n_local} now runs as {m.micro.count} micro-batches")
        torch.set_rng_state(rng)
        first_try = False
    m.micro.on_success()

    scaler = m.precision.scaler
    scaler.unscale_(m.optimizer)
    grads = [p.grad for p in m.params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    loss_v, norm_v = torch.stack([loss.float(), norm.float()]).tolist()  # the step's one wait for the device
    finite = math.isfinite(loss_v) and math.isfinite(norm_v)
    spike = m.trend.observe(loss_v)
    if not finite:
        action = "nonfinite"
    elif spike and cfg.on_spike != "log":
        action = "spike"
    else:
        action = "update"
    if action == "update":
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(m.params, cfg.grad_clip, norm)
        scaler.step(m.optimizer)
        m.scheduler.step()
        m.step += 1
        m.health.nonfinite_run = 0
    elif action == "nonfinite":
        m.health.skipped_nonfinite += 1
        m.health.nonfinite_run += 1
    else:
        m.health.skipped_spikes += 1
    # a non-finite loss is a spike too, and rolls back; a finite loss with overflowing
    # gradients (routine for fp16's loss scaler) is only skipped
    rolled = action != "update" and spike is not None and cfg.on_spike == "rollback" and m.snapshot is not None
    if rolled:
        m.rollback()
        m.health.rollbacks += 1
    if spike or action != "update":
        what = f"spike, {spike}" if spike else f"gradient norm {norm_v}"
        done = "" if action == "update" else "; rolled back to the last good state" if rolled else "; update skipped"
        echo(f"[step {step + 1}] {m.name}: {what}{done}")
    scaler.update()  # lowers an fp16 loss scale after an overflow, raises it after a calm stretch
    if m.health.nonfinite_run >= cfg.max_nonfinite:
        if m.precision.mode == "fp32":
            raise TrainingError(f"{m.name}: the loss or its gradients were not finite for {m.health.nonfinite_run} "
                                f"steps in a row in fp32 (up to step {step + 1}); training has diverged: lower --lr, "
                                f"or resume from an earlier checkpoint")
        echo(f"[step {step + 1}] {m.name}: {m.health.nonfinite_run} non-finite steps in a row under "
             f"{m.precision.mode}; falling back to fp32 for the rest of the run")
        m.precision.fall_back(step + 1)
        m.health.nonfinite_run = 0
    return StepResult(loss_v, norm_v, stats)


def evaluate_member(task: Task, m: Member, step: int, batch_size: int, device: torch.device, echo) -> Evaluation:
    """``task.evaluate`` under the member's autocast; out of memory, it is run again in
    smaller batches: first the training micro-batch, then halves of it."""
    while True:
        failed = False
        try:
            with m.precision.autocast():
                return task.evaluate(m.name, m.model, step, m.micro.eval_limit)
        except Exception as e:  # noqa: BLE001 (only out-of-memory is handled; the rest re-raised)
            if not is_out_of_memory(e):
                raise
            failed = True
        if failed:
            free_memory(device)
            try:
                m.micro.on_eval_oom(batch_size, step)
            except RuntimeError as e:
                raise TrainingError(f"{m.name}: {e}") from None
            echo(f"[step {step}] {m.name}: out of memory in evaluation; evaluating {m.micro.eval_limit} at a time")


def time_pass(run: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``run`` takes, the device's queued work included."""
    synchronize(device)
    t = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - t


def choose_speed(m: Member, task: Task, batch: dict[str, torch.Tensor], step: int, n_global: int,
                 cfg: TrainConfig, device: torch.device, d: Dist, echo) -> None:
    """Settle what ``--micro-batch N|auto`` and ``--precision auto`` leave open, once per run
    (both choices are checkpointed). ``auto`` times a forward and backward pass of this batch
    for every pair of candidate precision (fp32 and bf16, on a CPU with native bf16) and
    micro-batch count (1, 2, 4, ...): the best micro-batch size can differ by precision, so
    they are chosen together. bf16 is kept only when its best time beats fp32's by
    ``BF16_MARGIN``; then the fastest count in that precision (``fastest``). On a CPU a
    smaller working set can beat one large matrix product. Weights, RNG and task state are
    left as they were; under torchrun rank 0's clock decides for all."""
    n_local = _rows(batch)
    if cfg.micro_batch not in ("off", "auto"):
        m.micro.set_floor(min(n_local, -(-n_local // int(cfg.micro_batch))))
    time_counts = cfg.micro_batch == "auto" and not m.micro.tuned
    counts = micro_batch_counts(n_local) if time_counts else [m.micro.count]
    modes = m.precision.candidates if m.precision.undecided else (m.precision.mode,)
    if len(counts) * len(modes) == 1:
        m.micro.tuned = m.micro.tuned or time_counts
        return
    rng, task_state, before = torch.get_rng_state(), task.state_dict(), m.micro.count

    def timed_pass() -> float:
        return time_pass(lambda: forward_backward(m, task, batch, step, n_global, {}, True, d, device), device)

    timings: dict[tuple[str, int], float] = {}
    reps = None
    for mode in modes:
        m.precision.use(mode)
        warm = True  # each precision's first pass builds its kernels, and is not timed
        for count in counts:
            m.micro.count = count
            tries: list[float] = []
            try:
                if warm:
                    first = timed_pass()
                    if reps is None:  # quick steps are noisy, so they are timed thrice; every rank must agree
                        reps = broadcast(3 if first < 0.5 else 2 if len(modes) > 1 else 1, d)
                    warm = False
                for _ in range(reps):
                    tries.append(timed_pass())
            except Exception as e:  # noqa: BLE001 (a pair that does not fit is no candidate)
                if not is_out_of_memory(e):
                    raise
                tries.append(math.inf)
            timings[(mode, count)] = min(tries)
            m.optimizer.zero_grad(set_to_none=True)
    free_memory(device)
    timings = broadcast(timings, d)
    torch.set_rng_state(rng)
    task.load_state_dict(task_state)
    m.micro.count = before
    if len(modes) > 1:
        per_mode = {mode: min(t for (mo, _), t in timings.items() if mo == mode) for mode in modes}
        chosen = m.precision.decide(per_mode)
        shown = ", ".join(f"{mode} {t:.3g} s" for mode, t in per_mode.items())
        echo(f"{m.name}: --precision auto: {chosen} ({shown} per pass of the first batch; bf16 must be "
             f"{BF16_MARGIN:.0%} faster)")
    else:
        m.precision.use(modes[0])
    if time_counts:
        mine = {count: t for (mo, count), t in timings.items() if mo == m.precision.mode}
        best = fastest(mine)
        m.micro.count = max(before, best)
        m.micro.set_floor(best)
        m.micro.tuned = True
        shown = ", ".join(f"{-(-n_local // c)}: {t:.3g} s" for c, t in mine.items())
        echo(f"{m.name}: --micro-batch auto: {-(-n_local // best)} examples at a time is the fastest "
             f"in {m.precision.mode} ({shown})")


def _accumulate(state: LoopState, m: Member, r: StepResult) -> None:
    slot = state.acc.setdefault(m.name, {"n": 0})
    if not math.isfinite(r.loss):
        return  # counted in the health figures; a nan would poison the interval's mean
    slot["n"] += 1
    for k, v in {"loss": r.loss, "grad_norm": r.grad_norm, **r.stats}.items():
        slot[k] = slot[k] + v if k in slot else v


def train(task: Task, cfg: TrainConfig, run: Run, config: dict[str, Any], resume: Checkpoint | None = None,
          echo=print, restart: bool = False) -> Summary:
    """Train every member of ``task`` in lockstep; returns what the report needs.

    ``resume``: continue from this checkpoint exactly as if the run had never stopped.
    ``restart``: the run folder has logs of an earlier attempt (resumed without a usable
    checkpoint); they are purged from the step training starts at.
    The run's status in run.json and the runs index follows: running, then finished,
    interrupted (Ctrl+C) or failed (an exception, re-raised).
    Under torchrun (``engine/distributed.py``) every rank calls this; only rank 0 speaks,
    locks the run and writes anything."""
    d = current()
    if not d.main:
        return _train(task, cfg, _ReadOnlyRun(run.id, run.task, run.dir), config, resume, lambda *a, **k: None,
                      False, contextlib.ExitStack(), d)
    run.acquire()
    try:
        with contextlib.ExitStack() as cleanup:  # writers are closed (flushed) however training ends
            summary = _train(task, cfg, run, config, resume, echo, restart or resume is not None, cleanup, d)
    except KeyboardInterrupt:
        run.update(status="interrupted")
        raise
    except BaseException:
        run.update(status="failed")
        raise
    finally:
        run.release()
    task.report(run, summary)
    return summary


class _NullWriter:
    """What ranks other than 0 log to."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class _ReadOnlyRun(Run):
    """The run as ranks past 0 see it: they train it and write nothing (rank 0 does)."""

    def update(self, **fields: Any) -> None:
        pass

    def writer(self, member: str, purge_step: int | None = None) -> _NullWriter:
        return _NullWriter()


def _train(task: Task, cfg: TrainConfig, run: Run, config: dict[str, Any], resume: Checkpoint | None,
           echo, purge: bool, cleanup: contextlib.ExitStack, d: Dist = Dist()) -> Summary:
    from tqdm import tqdm

    device = device_for(resolve_device(cfg.device), d)
    models = task.build_models()  # the task seeds each member alike, so shared parts start equal
    members = [make_member(name, model.to(device), cfg, device) for name, model in models.items()]
    seed_everything(cfg.seed + 1 + 7919 * d.rank)  # dropout and anything else random in training
    state = restore(resume, task, members, device, d) if resume is not None else LoopState()
    for m in members:  # after the restore: DDP starts every rank from rank 0's weights
        m.ddp = wrap(m.model, device, d)
        if cfg.compile:  # training only; evaluation, sampling and checkpoints use the plain module
            m.ddp = torch.compile(m.ddp)
    start_step = state.step
    if cfg.max_steps is not None and state.step >= cfg.max_steps:
        echo(f"already at step {state.step} of --max-steps {cfg.max_steps}: nothing to train")
    for m in members:
        fell = f" (fell back from {cfg.precision} at step {m.precision.fell_back_at})" \
            if m.precision.fell_back_at is not None else ""
        mode = f"auto, timing {' and '.join(m.precision.candidates)}" if m.precision.undecided else m.precision.mode
        echo(f"{m.name}: {m.num_parameters:,} parameters, precision {mode}{fell}")
        m.model.train()  # evaluation and sampling put it back in train mode when they are done
        if cfg.on_spike != "rollback":
            m.snapshot = None
        elif m.snapshot is None:
            m.take_snapshot()
    if cfg.micro_batch == "off":
        for m in members:
            m.micro.set_floor(1)
    open_choice = cfg.micro_batch != "off" or any(m.precision.undecided for m in members)
    if open_choice and (cfg.max_steps is None or state.step < cfg.max_steps):
        full = task.batch(state.step)
        first = {k: v.to(device) for k, v in shard(full, d).items()}
        for m in members:
            choose_speed(m, task, first, state.step, _rows(full), cfg, device, d, echo)

    # everything logged at a checkpoint's step was written (and flushed) before the checkpoint,
    # so a resume keeps the events up to that step and purges the ones after it
    writers = {m.name: run.writer(m.name, purge_step=state.step + 1 if purge else None) for m in members}
    for w in writers.values():
        cleanup.callback(w.close)
    run.update(status="running", device=str(device), step=state.step, max_steps=cfg.max_steps,
               members=[m.name for m in members], config=config, pid=os.getpid())
    eta = Eta()
    eta.load_state_dict(state.eta)
    interval = {m.name: (m.train_seconds, m.examples) for m in members}
    metric, mode = task.best_metric
    planned = faults.plan()  # {} unless a test asked for faults
    last_eval = last_save = last_sample = state.step
    t_start = t_saved = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not (cfg.progress and d.main), dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]" if cfg.max_steps else None)
    say = bar.write if d.main else echo  # echo is silent on the other ranks

    def log_scalars() -> None:
        step, post = state.step, {}
        memory = memory_figures(device)
        for m in members:
            w = writers[m.name]
            slot = state.acc.get(m.name, {})
            n = slot.get("n", 0)
            if d.active:  # the loss is already the global batch's; each rank holds its share of the stats
                shares = sorted(k for k in slot if k not in ("n", "loss", "grad_norm"))
                summed = all_sum([_scalar(slot[k]) for k in shares], device).tolist()
                slot = {**slot, **dict(zip(shares, summed))}
            values = {k: _scalar(v) / n for k, v in slot.items() if k != "n"} if n else {}
            for k, v in values.items():
                w.add_scalar(f"train/{k}", v, step)
            w.add_scalar("train/lr", m.lr, step)
            if m.trend.values:
                w.add_scalar("train/loss_avg", m.trend.mean, step)
                w.add_scalar("train/loss_ema", m.trend.ema, step)
            for k, v in task.scalars(step - 1).items():
                w.add_scalar(f"train/{k}", v, step)
            health = {"loss_spikes": m.trend.spikes, "skipped_nonfinite": m.health.skipped_nonfinite,
                      "skipped_spikes": m.health.skipped_spikes, "rollbacks": m.health.rollbacks,
                      "micro_batches": m.micro.count, "oom_retries": m.micro.ooms, "lr_scale": m.plateau.scale,
                      "fp32_fallback": float(m.precision.fell_back_at is not None)}
            for k, v in health.items():
                w.add_scalar(f"health/{k}", v, step)
            for k, v in memory.items():
                w.add_scalar(f"memory/{k}", v, step)
            secs, ex = interval[m.name]
            if m.train_seconds > secs:
                w.add_scalar("perf/examples_per_sec", (m.examples - ex) / (m.train_seconds - secs), step)
            interval[m.name] = (m.train_seconds, m.examples)
            if "loss" in values:
                m.losses.append([step, values["loss"]])
                post[m.name] = f"{values['loss']:.3f}"
            if cfg.on_spike == "rollback":
                m.take_snapshot()  # every update since the last one passed the spike check
        if cfg.max_steps is None:
            post["rate"] = eta.rate()
        else:
            pauses = {"eval": due(step, cfg.max_steps, cfg.eval_every), "save": due(step, cfg.max_steps, cfg.save_every),
                      "sample": due(step, cfg.max_steps, cfg.sample_every)}
            post["eta"] = format_duration(eta.eta(cfg.max_steps - step, pauses))
        bar.set_postfix(post, refresh=False)
        state.acc, state.acc_steps = {}, 0

    def evaluate_all(track_best: bool = True) -> None:
        """``track_best`` False: for the user's eyes only, changing no state (no best
        checkpoint, no plateau count)."""
        nonlocal last_eval
        rng = rng_state()  # evaluation must not move the training RNG, or a resume would differ
        parts, scores = [], []
        for m in members:
            if d.main:
                m.model.eval()
                ev = evaluate_member(task, m, state.step, cfg.batch_size, device, say)
                m.model.train()  # here, not every step: walking the modules costs ~1 ms
            # every rank needs the metrics: they drive the plateau cuts and the best checkpoint
            metrics = broadcast(ev.metrics if d.main else None, d)
            if not d.main:
                ev = Evaluation(metrics)
            m.evals.append({"step": state.step, **ev.metrics})
            for k, v in ev.metrics.items():
                writers[m.name].add_scalar(f"val/{k}", v, state.step)
            if ev.lines:
                writers[m.name].add_text("val/mistakes", "\n\n".join(ev.lines), state.step)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in list(ev.metrics.items())[:3])
            parts.append(f"{m.name}: {shown}" + "".join(f"\n    {line}" for line in ev.lines[:3]))
            scores.append(float(ev.metrics.get(metric, float("nan"))))
            old_lr = m.lr
            if track_best and "val_loss" in ev.metrics and m.plateau.observe(ev.metrics["val_loss"], old_lr):
                m.set_lr()
                parts.append(f"{m.name}: val loss flat for {m.plateau.patience} evaluations: LR {old_lr:.3g} -> "
                             f"{m.lr:.3g} (cut {m.plateau.cuts})")
        set_rng_state(rng)
        say(f"[step {state.step}] " + "\n           ".join(parts))
        last_eval = state.step
        score = sum(scores) / len(scores)
        if track_best and _better(score, state.best_score, mode):
            state.best_score = score
            save(run, task, members, state, cfg, config, best={"metric": metric, "mode": mode, "value": score}, d=d)

    def sample_all() -> None:
        nonlocal last_sample
        last_sample = state.step
        if not d.main:
            return
        rng = rng_state()  # like evaluation, sampling must not move the training RNG
        for m in members:
            m.model.eval()
            with m.precision.autocast():
                s = task.sample(m.name, m.model, state.step)
            m.model.train()
            for k, v in s.metrics.items():
                writers[m.name].add_scalar(f"samples/{k}", v, state.step)
            if s.text:
                writers[m.name].add_text("samples/text", s.text, state.step)
            say(f"[step {state.step}] {m.name} sample" + "".join(f"\n    {line}" for line in s.lines))
        set_rng_state(rng)

    def checkpoint() -> None:
        nonlocal last_save, t_saved
        state.eta = eta.state_dict()
        for w in writers.values():
            w.flush()  # the events up to this step reach the disk before the checkpoint does
        save(run, task, members, state, cfg, config, d=d)
        last_save, t_saved = state.step, time.perf_counter()
        run.update(step=state.step)

    def timed(kind: str, action, *args) -> None:
        t = time.perf_counter()
        action(*args)
        eta.add_pause(kind, time.perf_counter() - t)

    with _StopOnInterrupt() as stop:
        while (cfg.max_steps is None or state.step < cfg.max_steps) and not stop.requested:
            t0 = time.perf_counter()
            step = state.step
            full = task.batch(step)  # the global batch; under torchrun each rank trains on its slice
            n_examples = _rows(full)
            batch = {k: v.to(device, non_blocking=True) for k, v in shard(full, d).items()}
            for m in members:
                t_m = time.perf_counter()
                r = member_step(m, task, batch, step, cfg, planned, device, say, n_examples, d)
                m.examples += n_examples
                _accumulate(state, m, r)
                synchronize(device)
                m.train_seconds += time.perf_counter() - t_m
            state.step += 1
            state.acc_steps += 1
            eta.add_step(time.perf_counter() - t0)
            bar.update(1)
            if state.step in planned.get("interrupt", ()):
                stop.requested = True
            save_now = cfg.save_every_minutes is not None and time.perf_counter() - t_saved >= 60 * cfg.save_every_minutes
            if d.active:  # a stop on any rank stops every rank after this step; rank 0's clock says when to save
                agreed = all_sum([float(stop.requested), float(save_now and d.main)], device).tolist()
                stop.requested, save_now = agreed[0] > 0, agreed[1] > 0
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                log_scalars()
            if state.step % cfg.eval_every == 0:
                timed("eval", evaluate_all)
            if cfg.sample_every and state.step % cfg.sample_every == 0:
                timed("sample", sample_all)
            if state.step % cfg.save_every == 0 or save_now:
                timed("save", checkpoint)
            if state.step in planned.get("kill", ()):
                faults.kill_now()
    bar.close()
    interrupted = stop.requested
    trained = state.step > start_step
    if not interrupted:
        if state.acc_steps:
            log_scalars()
        if trained and last_eval != state.step:
            evaluate_all()
        if cfg.sample_every and trained and last_sample != state.step:
            sample_all()
    # an interrupted run keeps its partial log sums in the checkpoint, so a resume logs
    # exactly what an unbroken run would have
    if last_save != state.step or (resume is None and state.step == 0):
        checkpoint()
    if interrupted and trained and last_eval != state.step:
        # for the user's eyes only: the checkpoint is written, so a resume continues as if
        # this evaluation never happened (and it cannot become the best checkpoint)
        evaluate_all(track_best=False)
    for w in writers.values():
        w.close()
    wall = time.perf_counter() - t_start
    run.update(status="interrupted" if interrupted else "finished", step=state.step)
    if interrupted:
        echo(f"interrupted at step {state.step}; checkpoint saved in {run.checkpoints}; "
             f"continue with --resume {run.id}")
    return Summary(run, members, state.step, wall, interrupted, config)
