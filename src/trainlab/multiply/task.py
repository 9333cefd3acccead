"""The multiplication comparison as a task of the shared engine.

Members ``simple`` and ``latent`` (or a subset, ``--members``) are built from the same
width and depth flags, seeded alike, and trained by ``engine.train()`` on the same
batches with the same teacher-forcing coin flips.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainlab.config import ConfigError
from trainlab.engine.device import resolve_device
from trainlab.engine.member import Summary
from trainlab.engine.memory import check_model_fits
from trainlab.engine.task import Evaluation, StepLoss
from trainlab.engine.tracking import Run
from trainlab.engine.train_config import TrainConfig
from trainlab.multiply.config import (
    BOS,
    DIGIT0,
    TASK_NAME,
    TOKENS,
    LossConfig,
    MultiplyDataConfig,
    MultiplyTaskConfig,
    Seq2SeqConfig,
    TeacherForcingConfig,
)
from trainlab.multiply.data import MultiplicationDataset
from trainlab.multiply.evaluation import decode_problems, evaluate_members, summarize
from trainlab.multiply.loss import SequenceAccuracyLoss
from trainlab.multiply.models import build_model


def sequence_length(data: MultiplyDataConfig) -> int:
    """Source and target length of every problem of the range (operands or answer, and a marker)."""
    return 2 * data.max_digits + 1


def member_config(model: Seq2SeqConfig, kind: str, data: MultiplyDataConfig) -> Seq2SeqConfig:
    """One member's own config: its kind, the range's sequence lengths, and its own MLP width
    when ``--ff-simple`` or ``--ff-latent`` gives one."""
    ds_len = sequence_length(data)
    ff = (model.ff_simple if kind == "simple" else model.ff_latent) or model.dim_feedforward
    return replace(model, kind=kind, src_len=ds_len, tgt_len=ds_len, dim_feedforward=ff,
                   answer_places=answer_places(model, data))


def answer_places(model: Seq2SeqConfig, data: MultiplyDataConfig) -> str:
    """What ``--abacus`` embeds at each answer position (``none`` without it). Natural order
    without padding has no fixed place per position: the place of the first digit is the
    answer's length, which inference must not be told."""
    if not model.abacus:
        return "none"
    if data.answer_order == "reversed":
        return "lsd"
    if data.answer_pad:
        return "msd"
    raise ConfigError("abacus", "needs --answer-pad or --answer-order reversed: in natural order without "
                                "padding an answer position's place value is the answer's length, unknown "
                                "until it is written")


def running_sum_loss(logits: torch.Tensor, target: torch.Tensor, tgt_out: torch.Tensor) -> torch.Tensor:
    """Per sequence (B,): the running-sum head's cross-entropy (logits (B, T, C)), the mean over
    the answer's digit positions (not <eos> or padding). A classification, not a regression:
    its scale is the token loss's, and a running sum is only of use when exact (its last
    digit is the answer's, the rest is the carry out)."""
    B, T, C = logits.shape
    digit = (tgt_out >= DIGIT0) & (tgt_out < DIGIT0 + 10)  # (B, T)
    ce = F.cross_entropy(logits.reshape(B * T, C).float(), target.reshape(B * T), reduction="none").view(B, T)
    return (ce * digit).sum(1) / digit.sum(1).clamp(min=1)  # (B,)


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
        batch = {"src": enc["src"], "tgt_in": enc["tgt_in"], "tgt_out": enc["tgt_out"]}
        if any(cfg.carry_loss > 0 for cfg in self.model_cfgs.values()):
            batch["running_sum"] = enc["running_sum"]  # (B, T): the auxiliary loss's targets
        return batch

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
        weight = self.model_cfgs[member].carry_loss
        if weight > 0:
            logits, sums = model(batch["src"], batch["tgt_in"], own_guesses=not forced, running_sums=True)
        else:
            logits, sums = model(batch["src"], batch["tgt_in"], own_guesses=not forced), None  # (B, T, V)
        aux = None if sums is None else running_sum_loss(sums, batch["running_sum"], batch["tgt_out"])  # (B,)
        loss, stats = self.criterion(logits, batch["tgt_out"], None if aux is None else weight * aux)
        shown = {"seq_accuracy": stats["exact_match"], "token_accuracy": stats["token_accuracy"]}
        if aux is not None:
            shown["running_sum_loss"] = aux.detach().mean()
        return StepLoss(loss, shown, stats["weight"])

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

    def evaluate_part(self, member: str, model: nn.Module, step: int, batch_limit: int | None, part: float) -> float:
        """The same share of each slice of problems an evaluation decodes and scores, about
        ``part``, run only to time it; returns the share that ran. Each slice runs at least 128
        problems (or all it has): a decoding step has a fixed cost, which in a few rows would be
        most of the time, and scaled up would count many times over."""
        bs = min(self.task_cfg.eval_batch_size, batch_limit or self.task_cfg.eval_batch_size)
        val, train = self.val_indices(), self.train_indices()
        share = min(1.0, max(part, *(128 / len(x) for x in (val, train) if len(x))))
        v, t = (max(1, round(share * len(x))) for x in (val, train))
        decode_problems(model, self.dataset, val[:v], bs)
        self.teacher_forced_loss(model, val[:v], bs)
        decode_problems(model, self.dataset, train[:t], bs)
        return share

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

    def report_cost(self) -> float:
        """The report's test scoring in units of one evaluation (which decodes the val and the
        train slice): what a time budget keeps for it at the end."""
        test = min(self.task_cfg.test_n, self.dataset.split_counts()["test"])
        return test / max(1, len(self.val_indices()) + len(self.train_indices()))

    def report_part(self, models: dict[str, nn.Module], part: float) -> float:
        """About ``part`` of the report's test scoring (every member decodes the same problems,
        at least one whole decoding batch, so each row costs what it costs there), run only to
        time it; returns the share that ran."""
        if not self.dataset.split_counts()["test"]:
            return 1.0  # the report scores nothing
        idx = self.dataset.subset("test", self.task_cfg.test_n, seed=0)
        n = min(len(idx), max(round(part * len(idx)), 1024))
        for model in models.values():
            decode_problems(model, self.dataset, idx[:n])
        return n / len(idx)

    def report(self, run: Run, summary: Summary) -> None:
        from trainlab.multiply.report import write_report

        test = {}
        if self.dataset.split_counts()["test"]:  # the final figure: the held-out test set's, with its interval
            test = evaluate_members({m.name: m.scored for m in summary.members}, self.dataset, "test",
                                    self.task_cfg.test_n, seed=0)
        path = write_report(run, summary, test)
        print(f"report: {path}")
