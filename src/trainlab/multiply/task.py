"""The multiplication comparison as a task of the shared engine.

Members ``simple`` and ``latent`` (or a subset, ``--members``) are built from the same
width and depth flags, seeded alike, and trained by ``engine.train()`` on the same
batches with the same teacher-forcing coin flips.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from trainlab.config import ConfigError, in_range, non_negative, one_of, positive
from trainlab.engine.device import resolve_device
from trainlab.engine.loop import Evaluation, StepLoss, Summary, TrainConfig
from trainlab.engine.memory import check_model_fits
from trainlab.engine.tracking import Run
from trainlab.multiply.data import (
    BOS,
    TOKENS,
    MultiplicationDataset,
    MultiplyDataConfig,
    decode_answer,
    digit_count,
)
from trainlab.multiply.loss import LossConfig, SequenceAccuracyLoss
from trainlab.multiply.models import MODEL_KINDS, Seq2SeqConfig, SimpleTransformer, build_model, greedy_decode

TASK_NAME = "parallel_comparison"
TF_SCHEDULES = ("none", "linear", "exp", "cosine")
# settings a resumed run may change (evaluation never touches the training trajectory)
RESUMABLE_TASK_CHANGES = frozenset({"eval_samples", "eval_batch_size", "grad_checkpointing", "test_n"})


@dataclass
class TeacherForcingConfig:
    """Probability that a batch is teacher-forced; otherwise the decoder reads its own guesses.

    ``p(step)`` is 1 before ``tf_start_step``; after it, it falls from 1 to ``tf_floor``
    over ``tf_decay_steps`` steps: linearly, as exp(-5t) (about 1% of the way left at
    the end), or along a half cosine. ``none`` keeps p = 1 (plain teacher forcing).
    """

    tf_schedule: str = field(default="none", metadata={"help": "teacher-forcing decay: none|linear|exp|cosine"})
    tf_start_step: int = field(default=0, metadata={"help": "step at which teacher forcing starts to decay"})
    tf_floor: float = field(default=0.0, metadata={"help": "lowest teacher-forcing probability"})
    tf_decay_steps: int = field(default=5000, metadata={"help": "steps from p = 1 down to the floor"})

    def __post_init__(self) -> None:
        one_of("tf_schedule", self.tf_schedule, TF_SCHEDULES)
        non_negative("tf_start_step", self.tf_start_step)
        positive("tf_decay_steps", self.tf_decay_steps)
        in_range("tf_floor", self.tf_floor, 0, 1)

    def prob(self, step: int) -> float:
        if self.tf_schedule == "none" or step < self.tf_start_step:
            return 1.0
        t = min(1.0, (step - self.tf_start_step) / self.tf_decay_steps)
        if self.tf_schedule == "linear":
            frac = 1.0 - t
        elif self.tf_schedule == "exp":
            frac = math.exp(-5.0 * t)
        else:
            frac = 0.5 * (1.0 + math.cos(math.pi * t))
        return self.tf_floor + (1.0 - self.tf_floor) * frac


@dataclass
class MultiplyTaskConfig:
    members: str = field(default="simple,latent", metadata={"help": "models to train side by side: simple,latent"})
    eval_samples: int = field(default=1000, metadata={"help": "held-out val problems per evaluation"})
    eval_batch_size: int = field(default=1024, metadata={"help": "problems decoded at once when evaluating"})
    test_n: int = field(default=10000, metadata={"help": "held-out test problems the report scores at the end "
                                                        "(all of them when the range has fewer)"})

    def __post_init__(self) -> None:
        names = self.member_list()
        if not names or any(n not in MODEL_KINDS for n in names) or len(set(names)) != len(names):
            raise ConfigError("members", f"must be a comma-separated subset of {','.join(MODEL_KINDS)}, got {self.members!r}")
        for name in ("eval_samples", "eval_batch_size", "test_n"):
            positive(name, getattr(self, name))

    def member_list(self) -> list[str]:
        return [n.strip() for n in self.members.split(",") if n.strip()]


def sequence_length(data: MultiplyDataConfig) -> int:
    """Source and target length of every problem of the range (operands or answer, and a marker)."""
    return 2 * data.max_digits + 1


def member_config(model: Seq2SeqConfig, kind: str, data: MultiplyDataConfig) -> Seq2SeqConfig:
    """One member's own config: its kind, the range's sequence lengths, and its own MLP width
    when ``--ff-simple`` or ``--ff-latent`` gives one."""
    ds_len = sequence_length(data)
    ff = (model.ff_simple if kind == "simple" else model.ff_latent) or model.dim_feedforward
    return replace(model, kind=kind, src_len=ds_len, tgt_len=ds_len, dim_feedforward=ff)


# -- evaluation, shared by training, `multiply evaluate` and `multiply ask` -----------------
@dataclass
class DecodeResult:
    a: np.ndarray
    b: np.ndarray
    predicted: list[int | None]  # None: not a well-formed number
    correct: np.ndarray  # bool per problem
    digit_hits: int
    digit_total: int


def decode_problems(model: SimpleTransformer, dataset: MultiplicationDataset, idx: np.ndarray,
                    batch_size: int = 1024) -> DecodeResult:
    """Free-running greedy answers to the problems ``idx``, and how right they are."""
    order = dataset.cfg.answer_order
    width = 2 * dataset.pad_width if dataset.cfg.answer_pad else 0  # digits compared, as written
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds: list[int | None] = []
    hits = total = 0
    for start in range(0, len(idx), batch_size):
        enc = dataset.encode(idx[start:start + batch_size])
        out = greedy_decode(model, enc["src"].to(device)).cpu()
        for row, a, b in zip(out.tolist(), enc["a"].tolist(), enc["b"].tolist()):
            p = decode_answer(row, order)
            preds.append(p)
            truth = str(a * b).zfill(width)
            guess = "" if p is None else str(p).zfill(width)
            if order == "reversed":
                truth, guess = truth[::-1], guess[::-1]
            hits += sum(x == y for x, y in zip(truth, guess))
            total += max(len(truth), len(guess))
    model.train(was_training)
    a, b = dataset.pairs(idx)
    correct = np.array([p == x * y for p, x, y in zip(preds, a.tolist(), b.tolist())], dtype=bool)
    return DecodeResult(a, b, preds, correct, hits, total)


def summarize(result: DecodeResult, n_mistakes: int = 3) -> Evaluation:
    metrics = {
        "exact_match": float(result.correct.mean()) if len(result.correct) else 0.0,
        "digit_accuracy": result.digit_hits / max(1, result.digit_total),
    }
    da, db = digit_count(result.a), digit_count(result.b)
    for x in sorted(set(da.tolist())):
        for y in sorted(set(db.tolist())):
            sel = (da == x) & (db == y)
            if sel.any():
                metrics[f"exact_match_{x}x{y}"] = float(result.correct[sel].mean())
    lines = []
    for i in np.flatnonzero(~result.correct)[:n_mistakes]:
        got = "(no number)" if result.predicted[i] is None else str(result.predicted[i])
        lines.append(f"{result.a[i]}*{result.b[i]} = {result.a[i] * result.b[i]}, model said {got}")
    return Evaluation(metrics, lines)


class MultiplyTask:
    """See the module docstring; the engine's Task protocol, implemented."""

    name = TASK_NAME
    best_metric = ("exact_match", "max")  # mean over members of val exact-match

    def __init__(self, data: MultiplyDataConfig, model: Seq2SeqConfig, loss: LossConfig, tf: TeacherForcingConfig,
                 task: MultiplyTaskConfig, train: TrainConfig) -> None:
        self.data_cfg, self.loss_cfg, self.tf, self.task_cfg, self.train_cfg = data, loss, tf, task, train
        self.dataset = MultiplicationDataset(data)
        self.model_cfgs = {k: member_config(model, k, data) for k in task.member_list()}
        self.member_names = list(self.model_cfgs)
        device = resolve_device(train.device)
        for name, cfg in self.model_cfgs.items():  # before any run folder exists
            check_model_fits(lambda cfg=cfg: build_model(cfg), device, f"the {name} model")
        self.criterion = SequenceAccuracyLoss(loss)
        self._val_idx: np.ndarray | None = None
        self._train_idx: np.ndarray | None = None
        self.forced_batches = 0
        self.sampled_batches = 0
        self.last_tf_prob = 1.0

    # -- models and batches ----------------------------------------------------------
    def build_models(self) -> dict[str, nn.Module]:
        models = {}
        for name, cfg in self.model_cfgs.items():
            torch.manual_seed(self.train_cfg.seed)  # shared parts of both members start identical
            models[name] = build_model(cfg)
        return models

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.train_cfg.seed, step])
        idx = self.dataset.sample("train", self.train_cfg.batch_size, rng, by_class=True)
        enc = self.dataset.encode(idx)
        return {"src": enc["src"], "tgt_in": enc["tgt_in"], "tgt_out": enc["tgt_out"]}

    def teacher_forced(self, step: int) -> bool:
        p = self.tf.prob(step)
        if p >= 1.0:
            return True
        # one coin per step, from (seed, step): the same for every member, and on resume
        return bool(np.random.default_rng([self.train_cfg.seed, step, 0x7F]).random() < p)

    def loss(self, member: str, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> StepLoss:
        forced = self.teacher_forced(step)
        self.last_tf_prob = self.tf.prob(step)
        if member == next(iter(self.model_cfgs)):
            self.forced_batches += forced
            self.sampled_batches += not forced
        logits = model(batch["src"], batch["tgt_in"], own_guesses=not forced)  # (B, T, V)
        loss, stats = self.criterion(logits, batch["tgt_out"])
        return StepLoss(loss, {"seq_accuracy": stats["exact_match"], "token_accuracy": stats["token_accuracy"]},
                        stats["weight"])

    def scalars(self, step: int) -> dict[str, float]:
        return {"teacher_forcing_prob": self.tf.prob(step)}

    # -- evaluation ------------------------------------------------------------------
    def val_indices(self) -> np.ndarray:
        if self._val_idx is None:
            self._val_idx = self.dataset.subset("val", self.task_cfg.eval_samples, seed=0)
        return self._val_idx

    def train_indices(self) -> np.ndarray:
        if self._train_idx is None:
            self._train_idx = self.dataset.subset("train", min(self.task_cfg.eval_samples, 500), seed=0)
        return self._train_idx

    def evaluate(self, member: str, model: nn.Module, step: int, batch_limit: int | None = None) -> Evaluation:
        """Held-out val metrics, plus exact-match on a fixed slice of the training problems
        (the gap between the two is memorisation; on a tiny range val may hold a handful)."""
        bs = min(self.task_cfg.eval_batch_size, batch_limit or self.task_cfg.eval_batch_size)
        ev = summarize(decode_problems(model, self.dataset, self.val_indices(), bs))
        ev.metrics["val_loss"] = self.teacher_forced_loss(model, self.val_indices(), bs)
        ev.metrics["train_exact_match"] = float(decode_problems(model, self.dataset, self.train_indices(), bs).correct.mean())
        return ev

    @torch.no_grad()
    def teacher_forced_loss(self, model: nn.Module, idx: np.ndarray, batch_size: int) -> float:
        """The training loss on the problems ``idx``, teacher-forced: what the plateau LR cut
        watches (exact-match can sit at 0 for a long while before it moves)."""
        device = next(model.parameters()).device
        total = weight = 0.0
        for start in range(0, len(idx), batch_size):
            enc = self.dataset.encode(idx[start:start + batch_size])
            logits = model(enc["src"].to(device), enc["tgt_in"].to(device))  # (B, T, V)
            loss, stats = self.criterion(logits, enc["tgt_out"].to(device))
            total += float(loss) * float(stats["weight"])
            weight += float(stats["weight"])
        return total / weight

    def sample(self, member: str, model: nn.Module, step: int) -> Evaluation:
        """A few val problems, answered free-running: a glance at what the model does now."""
        rng = np.random.default_rng([self.train_cfg.seed, step, 0x5A])
        idx = rng.choice(self.val_indices(), size=min(4, len(self.val_indices())), replace=False)
        r = decode_problems(model, self.dataset, idx)
        lines = [f"{a}*{b} = {a * b}, model said {'(no number)' if p is None else p}"
                 f"{'' if ok else '  (wrong)'}" for a, b, p, ok in zip(r.a, r.b, r.predicted, r.correct)]
        return Evaluation({}, lines, "\n\n".join(lines))

    # -- state and files -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"forced_batches": self.forced_batches, "sampled_batches": self.sampled_batches,
                "tf_prob": self.last_tf_prob}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.forced_batches = int(state["forced_batches"])
        self.sampled_batches = int(state["sampled_batches"])
        self.last_tf_prob = float(state["tf_prob"])

    def checkpoint_texts(self) -> dict[str, str]:
        vocab = {"tokens": TOKENS, "answer_order": self.data_cfg.answer_order,
                 "max_digits": self.data_cfg.max_digits, "bos": BOS}
        if self.data_cfg.answer_pad:  # only then, so checkpoints from before the option still match
            vocab["answer_pad"] = True
        return {"vocab.json": json.dumps(vocab, indent=2)}

    def member_texts(self, member: str) -> dict[str, str]:
        return {"model_config.json": json.dumps(asdict(self.model_cfgs[member]), indent=2)}

    def report(self, run: Run, summary: Summary) -> None:
        from trainlab.multiply.inference import evaluate_members
        from trainlab.multiply.report import write_report

        test = {}
        if self.dataset.split_counts()["test"]:  # the final figure: the held-out test set's, with its interval
            test = evaluate_members({m.name: m.model for m in summary.members}, self.dataset, "test",
                                    self.task_cfg.test_n, seed=0)
        path = write_report(run, summary, test)
        print(f"report: {path}")
