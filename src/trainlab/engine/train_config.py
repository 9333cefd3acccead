"""The loop's own settings (``TrainConfig``), which of them a resumed run may change, and the
LR schedule they define. Every task's train command has these flags besides its own."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trainlab.config import ConfigError, check_seed, in_range, non_negative, one_of, positive

SPIKE_ACTIONS = ("log", "skip", "rollback")
SCHEDULES = ("cosine", "wsd", "constant")
# defined here, not beside the optimizers and precisions they name, so that the flags (and
# so `--help`) need no PyTorch: optim.py and precision.py import them from here
OPTIMIZERS = ("adamw", "muon")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Settings of the loop itself, shared by every task."""

    max_steps: int | None = field(default=None, metadata={"help": "optimizer updates to run; none: until Ctrl+C "
                                                                  "(with --minutes: the count the budget fitted)"})
    minutes: float | None = field(default=None, metadata={
        "help": "a time budget: the whole command, from its start to the final checkpoint and report, ends within "
                "this many minutes; the step count (and the LR schedule's end) is fitted from this machine's "
                "measured pace (engine/budget.py); instead of --max-steps (a new run given both trains "
                "--max-steps)"})
    batch_size: int = field(default=128, metadata={"help": "examples per optimizer update"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final LR of the decay, as a fraction of --lr"})
    schedule: str = field(default="cosine", metadata={"help": "cosine (warmup, then a half cosine down to the final "
                                                              "LR) or wsd (warmup, stable at --lr, then a linear "
                                                              "decay over the last --decay-fraction of the steps) or "
                                                              "constant (warmup, then --lr throughout)"})
    decay_fraction: float = field(default=0.2, metadata={"help": "share of the steps after warmup that wsd spends "
                                                                 "decaying"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    lr_decay_steps: int | None = field(
        default=None, metadata={"help": "end of the decay; default --max-steps (constant LR if neither)"}
    )
    embed_lr: float | None = field(default=None, metadata={"help": "peak LR of the embeddings (AdamW; a tied "
                                                                     "head goes with them); default --lr"})
    head_lr: float | None = field(default=None, metadata={"help": "peak LR of an untied output layer (AdamW); "
                                                                   "default --lr"})
    weight_decay: float = field(default=0.01, metadata={"help": "decoupled weight decay on matrices (either optimizer)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw|muon (muon: orthogonalised momentum for the hidden "
                                                              "matrices, AdamW for the rest; same --lr scale)"})
    muon_momentum: float = field(default=0.95, metadata={"help": "Muon's Nesterov momentum"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.98, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip gradient norm to this; 0 disables"})
    ema: float = field(default=0.0, metadata={"help": "decay of a moving average of the weights, which evaluations, "
                                                      "samples, the report and checkpoints' model.pt then hold "
                                                      "(about the last 1/(1-decay) steps; engine/average.py); "
                                                      "0: off, the last weights"})
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
                                                          "(about 30 s of compiling on 2 CPU cores, 3 s from a warm "
                                                          "cache; chat-90s's bf16 steps ran 1.3x faster)"})
    tf32: bool = field(default=True, metadata={"help": "on CUDA, fp32 matmuls (--precision fp32, and whatever "
                                                       "autocast leaves in fp32) in TF32 on tensor cores, several "
                                                       "times faster; --no-tf32 for full fp32. Ignored on CPUs"})
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
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise ConfigError("minutes", f"must be a positive number of minutes, got {self.minutes}")
        positive("lr_decay_steps", self.lr_decay_steps, allow_none=True)
        positive("save_every_minutes", self.save_every_minutes, allow_none=True)
        positive("embed_lr", self.embed_lr, allow_none=True)
        positive("head_lr", self.head_lr, allow_none=True)
        if self.lr_decay_steps is None and self.max_steps is not None:
            # fixed when the run starts and saved with it: a resume that extends
            # --max-steps keeps the schedule it started with instead of jumping the LR
            self.lr_decay_steps = self.max_steps
        for name in ("batch_size", "lr", "eval_every", "save_every", "log_every", "max_nonfinite", "recover_after",
                     "spike_sigma"):
            positive(name, getattr(self, name))
        positive("keep_checkpoints", self.keep_checkpoints)
        check_seed("seed", self.seed)
        one_of("schedule", self.schedule, SCHEDULES)
        in_range("decay_fraction", self.decay_fraction, 0, 1, low_open=True)
        for name in ("warmup_steps", "weight_decay", "grad_clip", "sample_every", "plateau_patience",
                     "plateau_min_lr"):
            non_negative(name, getattr(self, name))
        in_range("min_lr_ratio", self.min_lr_ratio, 0, 1)
        in_range("ema", self.ema, 0, 1, high_open=True)
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
                               "on_spike", "plateau_patience", "plateau_factor", "plateau_min_lr", "micro_batch", "compile",
                               "tf32"})




def lr_lambda(cfg: TrainConfig):
    """Linear warmup to 1, then down to ``min_lr_ratio`` at ``lr_decay_steps``: along a half
    cosine, or (``wsd``: warmup-stable-decay) flat at 1 and then linearly over the last
    ``decay_fraction`` of the steps after warmup, which keeps the LR high longest."""
    def f(step: int) -> float:
        # read when asked, not when built: a time budget fits the horizon after the first steps
        horizon = cfg.lr_decay_steps or cfg.max_steps
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if horizon is None or cfg.schedule == "constant":
            return 1.0
        t = min(1.0, (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps))
        if cfg.schedule == "wsd":
            start = 1.0 - cfg.decay_fraction
            frac = 1.0 if t <= start else 1.0 - (t - start) / cfg.decay_fraction
            return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * frac
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return f
