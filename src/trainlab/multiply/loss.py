"""SequenceAccuracyLoss: token cross-entropy that leans on the sequences still wrong."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainlab.multiply.config import PAD, LossConfig


class SequenceAccuracyLoss(nn.Module):
    """Cross-entropy over non-PAD target tokens, weighted per sequence.

    For sequence s with mean token loss l_s and token accuracy acc_s (both over its
    non-PAD targets), the weight is w_s = 1 + seq_weight * (1 - acc_s), held constant
    (no gradient flows through the accuracy), and the loss is sum(w_s l_s) / sum(w_s):
    a weighted mean, so its scale stays that of plain cross-entropy while sequences
    with wrong digits count up to (1 + seq_weight) times as much as solved ones.

    ``extra`` (B,), optional: a per-sequence loss added to l_s before the weighting (the
    ``--carry-loss`` term), so it is weighted like the token loss and a batch split into
    micro-batches still gives the whole batch's loss.

    Returns ``(loss, stats)`` where stats holds detached tensors ``exact_match`` (the
    fraction of sequences with every non-PAD target right), ``token_accuracy`` and
    ``weight`` (sum(w_s), what combines micro-batches' losses into the whole batch's).
    """

    def __init__(self, cfg: LossConfig, pad_id: int = PAD) -> None:
        super().__init__()
        self.cfg = cfg
        self.pad_id = pad_id

    def forward(self, logits: torch.Tensor, target: torch.Tensor, extra: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B, T, V = logits.shape
        mask = target != self.pad_id  # (B, T)
        tok_loss = F.cross_entropy(
            logits.reshape(B * T, V).float(),
            target.reshape(B * T),
            ignore_index=self.pad_id,
            label_smoothing=self.cfg.label_smoothing,
            reduction="none",
        ).view(B, T)  # (B, T), 0 at PAD
        n_tok = mask.sum(1).clamp(min=1)  # (B,)
        seq_loss = tok_loss.sum(1) / n_tok  # (B,)
        if extra is not None:
            seq_loss = seq_loss + extra
        with torch.no_grad():
            correct = (logits.argmax(-1) == target) & mask  # (B, T)
            seq_acc = correct.sum(1) / n_tok  # (B,)
            weight = 1.0 + self.cfg.seq_weight * (1.0 - seq_acc)  # (B,)
            stats = {
                "exact_match": (correct.sum(1) == mask.sum(1)).float().mean(),
                "token_accuracy": correct.sum() / mask.sum().clamp(min=1),
                "weight": weight.sum(),
            }
        loss = (weight * seq_loss).sum() / weight.sum()
        return loss, stats
