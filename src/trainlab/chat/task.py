"""ChatGoT as a task of the shared engine: one member, a character GPT.

Batches are random windows of the train span (see ``chat/data.py``); evaluation is the
mean cross-entropy over a fixed set of val windows (the same ones at every
evaluation, so the curve moves only when the model does), plus the same measure on a
fixed set of train windows, whose gap to val shows overfitting. Samples during
training start from a line of val text and are scored for diversity.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainlab.chat.config import MEMBER, TASK_NAME, ChatTaskConfig, GPTConfig, SamplingConfig
from trainlab.chat.data import TextCorpus
from trainlab.chat.metrics import diversity
from trainlab.chat.model import GPT
from trainlab.chat.sampling import generate
from trainlab.engine.device import resolve_device
from trainlab.engine.member import Summary
from trainlab.engine.memory import check_model_fits
from trainlab.engine.task import Evaluation, StepLoss
from trainlab.engine.tracking import Run
from trainlab.engine.train_config import TrainConfig

EVAL_SEED = 0xE7A1
SPAN_ROWS = 64  # windows per pass when the report scores the whole val span
# On a CPU a scoring pass holds at most this many characters (windows x context): past it the
# activations outgrow the cache. The same windows in passes of 1,024-2,048 characters against
# 8,192-16,384 (what 64 windows of chat-20min's or chat-1min's context are): 1.1-1.2x faster in
# fp32 and under bf16 autocast; 512 is too few (benchmarks/scoring_rows.py, 2-core EPYC).
SCORE_CHARS = 2048


def auto_temperature(val_loss: float | None) -> float:
    """``--sample-temperature auto``: 0.6 + 0.1 * val loss, clipped to [0.7, 1.0].

    An untrained model (val loss ln(vocab), about 4.2 for 65 characters) samples at
    1.0, where its samples are honest noise; by val loss 1.5 (readable words) it
    samples at 0.75, cool enough to show what the model prefers without freezing it."""
    if val_loss is None or not math.isfinite(val_loss):
        return 1.0
    return min(1.0, max(0.7, 0.6 + 0.1 * val_loss))


SPEAKER = r"([A-Z][A-Za-z .'-]{0,29})"
INLINE = re.compile(rf"^{SPEAKER}:[ \t]+\S", re.M)  # NAME: line
BLOCK = re.compile(rf"^{SPEAKER}:[ \t]*$", re.M)  # NAME:  (speech on the lines below)


def detect_speakers(text: str, most: int = 8) -> dict[str, Any]:
    """The corpus's dialogue style (inline ``NAME: line``, block ``NAME:`` + lines, or none)
    and its most frequent speakers, from the first megabyte; the repl follows them."""
    head = text[:2**20]
    found = {"inline": INLINE.findall(head), "block": BLOCK.findall(head)}
    style = max(found, key=lambda k: len(found[k]))
    if len(found[style]) < 3:
        return {"style": "none", "speakers": []}
    return {"style": style, "speakers": [n for n, _ in Counter(n.strip() for n in found[style]).most_common(most)]}


def make_chat_task(cfgs: dict[str, Any]) -> "ChatTask":
    """The task from its section configs (data, model, task, train), reading the corpus.
    ``cfgs["model"]`` is completed with the corpus's vocabulary size. Corpora past the
    memory-map threshold are cached under ``<runs_dir>/.cache``."""
    d, tc = cfgs["data"], cfgs["train"]
    corpus = TextCorpus.load(d.text, d.val_fraction, cache_dir=Path(tc.runs_dir) / ".cache")
    cfgs["model"] = replace(cfgs["model"], vocab_size=corpus.vocab.size)
    return ChatTask(corpus, cfgs["model"], cfgs["task"], tc)


class ChatTask:
    """See the module docstring; the engine's Task protocol, implemented."""

    name = TASK_NAME
    best_metric = ("val_loss", "min")
    member_names = [MEMBER]

    def __init__(self, corpus: TextCorpus, model: GPTConfig, task: ChatTaskConfig, train: TrainConfig) -> None:
        corpus.check_windows(model.context_len)
        if model.vocab_size != corpus.vocab.size:
            raise ValueError("the model's vocab_size must be the corpus's")
        check_model_fits(lambda: GPT(model), resolve_device(train.device))  # before any run folder exists
        self.corpus, self.model_cfg, self.task_cfg, self.train_cfg = corpus, model, task, train
        self.speakers = detect_speakers(corpus.vocab.decode(corpus.tokens[:2**20]))
        self.last_val_loss: float | None = None
        newline = corpus.vocab.encode_known("\n")[0]
        self._line_starts = np.flatnonzero(np.asarray(corpus.val[:-1]) == newline[0]) + 1 if len(newline) else None
        self._fixed: dict[str, np.ndarray] = {}
        self._pass: tuple[int, np.ndarray] | None = None  # (index, starts) of the last pass read

    # -- models and batches ----------------------------------------------------------
    def build_models(self) -> dict[str, nn.Module]:
        torch.manual_seed(self.train_cfg.seed)
        return {MEMBER: GPT(self.model_cfg)}

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        ctx, B = self.model_cfg.context_len, self.train_cfg.batch_size
        if self.task_cfg.windows == "shuffled":
            starts = self.shuffled_starts(step * B, B)
        else:
            starts = self.corpus.random_starts("train", B, ctx, np.random.default_rng([self.train_cfg.seed, step]))
        return self.corpus.windows("train", starts, ctx)

    def shuffled_starts(self, first: int, n: int) -> np.ndarray:
        """Starts of the run's windows ``first`` to ``first + n - 1`` under ``--windows shuffled``:
        a function of the index alone, so a resumed run reads on where it stopped."""
        ctx = self.model_cfg.context_len
        k, _ = self.corpus.pass_windows("train", ctx)
        out = np.empty(n, dtype=np.int64)
        for i in range(n):
            p, j = divmod(first + i, k)
            if self._pass is None or self._pass[0] != p:  # a pass's order is drawn once, not per batch
                # 1 marks the stream apart from the random windows' rng(seed, step)
                rng = np.random.default_rng([self.train_cfg.seed, 1, p])
                self._pass = (p, self.corpus.pass_starts("train", ctx, rng))
            out[i] = self._pass[1][j]
        return out

    def loss(self, member: str, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> StepLoss:
        logits, _ = model(batch["x"])  # (B, T, V)
        return StepLoss(F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten()))

    def scalars(self, step: int) -> dict[str, float]:
        return {}

    # -- evaluation and samples ----------------------------------------------------------
    def fixed_starts(self, split: str) -> np.ndarray:
        """The windows every evaluation uses: drawn once from a fixed seed, not the run's."""
        if split not in self._fixed:
            rng = np.random.default_rng([EVAL_SEED, split == "val"])
            n = self.task_cfg.eval_batches * self.train_cfg.batch_size
            self._fixed[split] = self.corpus.random_starts(split, n, self.model_cfg.context_len, rng)
        return self._fixed[split]

    def scoring_rows(self, model: nn.Module, rows: int) -> int:
        """Windows per forward pass when scoring (evaluations, the report's span): ``rows``, and
        on a CPU at most ``SCORE_CHARS`` characters' worth, past which a pass's activations
        outgrow the cache."""
        if next(model.parameters()).device.type == "cpu":
            rows = min(rows, max(1, SCORE_CHARS // self.model_cfg.context_len))
        return rows

    def mean_loss(self, model: nn.Module, split: str, batch_limit: int | None = None) -> float:
        """Mean loss over the fixed windows every evaluation uses."""
        rows = min(self.train_cfg.batch_size, batch_limit or self.train_cfg.batch_size)
        return self.windows_loss(model, split, self.fixed_starts(split), self.scoring_rows(model, rows))

    def span_loss(self, model: nn.Module, split: str = "val") -> float:
        """Mean loss over every non-overlapping window of the span: the precise figure the
        fixed evaluation batches (nanoGPT's kind of estimate) approximate, and what the
        report ends with."""
        return self.windows_loss(model, split, self.span_starts(split), self.scoring_rows(model, SPAN_ROWS))

    @torch.no_grad()
    def windows_loss(self, model: nn.Module, split: str, starts: np.ndarray, batch: int) -> float:
        """Mean loss per character over the windows of ``split`` at ``starts``, ``batch`` at a time."""
        device = next(model.parameters()).device
        ctx = self.model_cfg.context_len
        total = 0.0
        for i in range(0, len(starts), batch):
            b = self.corpus.windows(split, starts[i:i + batch], ctx)
            logits, _ = model(b["x"].to(device))  # (B, T, vocab)
            total += float(F.cross_entropy(logits.flatten(0, 1), b["y"].to(device).flatten(), reduction="sum"))
        return total / (len(starts) * ctx)

    def span_starts(self, split: str) -> np.ndarray:
        data = self.corpus.val if split == "val" else self.corpus.train
        return np.arange(0, len(data) - self.model_cfg.context_len, self.model_cfg.context_len)

    report_in_fp32 = True  # the report's span loss runs without autocast: the precise figure

    def report_cost(self) -> float:
        """The report's whole-val-span loss in units of one evaluation (the fixed val and train
        batches): what a time budget keeps for it at the end."""
        return len(self.span_starts("val")) / (2 * len(self.fixed_starts("val")))

    def report_part(self, models: dict[str, nn.Module], part: float) -> float:
        """The first ``part`` of the report's whole-span scoring (whole batches, in fp32 as the
        report runs it), run only to time it; returns the share that ran."""
        model = next(iter(models.values()))
        starts, bs = self.span_starts("val"), self.scoring_rows(model, SPAN_ROWS)
        n = min(len(starts), bs * max(1, round(part * len(starts) / bs)))
        self.windows_loss(model, "val", starts[:n], bs)
        return n / max(1, len(starts))

    def evaluate(self, member: str, model: nn.Module, step: int, batch_limit: int | None = None) -> Evaluation:
        val = self.mean_loss(model, "val", batch_limit)
        self.last_val_loss = val
        return Evaluation({"val_loss": val, "val_perplexity": math.exp(min(val, 50.0)),
                           "train_loss": self.mean_loss(model, "train", batch_limit)})

    def evaluate_part(self, member: str, model: nn.Module, step: int, batch_limit: int | None, part: float) -> float:
        """The first ``part`` of an evaluation's batches (at least one), run only to time it;
        returns the share of the evaluation that ran."""
        bs = self.scoring_rows(model, min(self.train_cfg.batch_size, batch_limit or self.train_cfg.batch_size))
        ran = whole = 0
        for split in ("val", "train"):
            starts = self.fixed_starts(split)
            n = min(len(starts), bs * max(1, round(part * len(starts) / bs)))  # whole batches, as evaluate runs
            self.windows_loss(model, split, starts[:n], bs)
            ran, whole = ran + n, whole + len(starts)
        return ran / whole

    def sample_prompt(self, rng: np.random.Generator) -> list[int]:
        """``prompt_chars`` of val text starting at a line start (anywhere, if it has no lines)."""
        n = min(self.task_cfg.prompt_chars, len(self.corpus.val) - 1)
        starts = self._line_starts[self._line_starts <= len(self.corpus.val) - n] if self._line_starts is not None \
            else np.zeros(0, dtype=np.int64)
        at = int(rng.choice(starts)) if len(starts) else int(rng.integers(0, len(self.corpus.val) - n + 1))
        return [int(t) for t in self.corpus.val[at:at + n]]

    def sample_temperature(self) -> float:
        t = self.task_cfg.sample_temperature
        return auto_temperature(self.last_val_loss) if t == "auto" else float(t)

    def sample(self, member: str, model: nn.Module, step: int) -> Evaluation:
        rng = np.random.default_rng([self.train_cfg.seed, step, 0x5A])
        prompt = self.sample_prompt(rng)
        temperature = self.sample_temperature()
        cfg = SamplingConfig(temperature=temperature, max_new_tokens=self.task_cfg.sample_tokens)
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        vocab = self.corpus.vocab
        completion = "".join(generate(model, prompt, cfg, lambda i: vocab.chars[i], g))
        head = vocab.decode(prompt)
        metrics = {"temperature": temperature, **diversity(completion)}
        text = (f"temperature {temperature:.2f}; prompt from val text:\n\n```\n{head}\n```\n\nsample:\n\n"
                f"```\n{completion}\n```")
        lines = [f"(temperature {temperature:.2f}) {head!r} ->", *completion.splitlines()]
        return Evaluation(metrics, lines, text)

    # -- state and files -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"last_val_loss": self.last_val_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_val_loss = state.get("last_val_loss")

    def checkpoint_texts(self) -> dict[str, str]:
        corpus = {**self.corpus.info(), "dialogue": self.speakers}
        return {"vocab.json": self.corpus.vocab.to_json(), "corpus.json": json.dumps(corpus, indent=2)}

    def member_texts(self, member: str) -> dict[str, str]:
        return {"model_config.json": json.dumps(asdict(self.model_cfg), indent=2)}

    def report(self, run: Run, summary: Summary) -> None:
        from trainlab.chat.report import write_report

        m = summary.members[0]
        with m.scoring() as model:  # the moving average of the weights under --ema
            span = self.span_loss(model) if summary.step > 0 and not summary.interrupted else None
        print(f"report: {write_report(run, summary, span, len(self.span_starts('val')), self.model_cfg.context_len)}")
