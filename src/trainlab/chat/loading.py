"""A trained chat model loaded for use (``generate``, ``repl``, ``serve``, ``export``): rebuilt
from its checkpoint's own config and vocabulary, in the weights' precision asked for, with
what a page or a model card shows of where it came from."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from trainlab.chat.config import MEMBER, GPTConfig
from trainlab.chat.data import CharVocab
from trainlab.chat.model import GPT
from trainlab.config import ConfigError
from trainlab.engine.checkpoint import Checkpoint
from trainlab.engine.errors import CheckpointError
from trainlab.engine.memory import check_model_fits


@dataclass
class ChatModel:
    model: GPT
    vocab: CharVocab
    dialogue: dict  # {"style": ..., "speakers": [...]}, from corpus.json


WEIGHTS = ("fp32", "bf16")


def with_weights(model: GPT, weights: str, device: torch.device, warn: Callable[[str], None] | None = None) -> GPT:
    """``model`` in the weights' precision for decoding: fp32 (the default: the numbers the
    model trained to), or bf16 where the device computes it natively (half the bytes each
    character's pass reads: about 1.6x faster on an AVX-512-BF16 CPU; the text differs from
    fp32's, but a served stream is still the same alone, among others and on any thread
    count, as the server checks at warm-up). Elsewhere bf16 falls back to fp32 in one line."""
    if weights not in WEIGHTS:
        raise ConfigError("weights", f"must be one of {'|'.join(WEIGHTS)}, got {weights!r}")
    if weights == "fp32":
        return model
    from trainlab.engine.precision import cpu_has_native_bf16

    native = cpu_has_native_bf16() if device.type == "cpu" else device.type == "cuda" and torch.cuda.is_bf16_supported()
    if not native:
        if warn is not None:
            warn(f"warning: --weights bf16: no native bf16 on this {device.type} (it would run 10-100x slower); "
                 f"decoding in fp32")
        return model
    return model.to(torch.bfloat16)


def load_chat_model(ckpt: Checkpoint, device: torch.device) -> ChatModel:
    """The model rebuilt from the checkpoint's own config and vocabulary."""
    try:
        vocab = CharVocab.from_json(ckpt.text("vocab.json"))
    except ValueError as e:  # bad JSON, or not a character vocabulary
        raise CheckpointError(f"{ckpt.path}: unreadable vocab.json ({e})") from None
    cfg = ckpt.config(f"{MEMBER}/model_config.json", GPTConfig)
    if cfg.vocab_size != vocab.size:
        raise CheckpointError(f"{ckpt.path}: model vocabulary {cfg.vocab_size} != vocab.json's {vocab.size}")
    check_model_fits(lambda: GPT(cfg), device, f"{ckpt.path}'s model")
    model = GPT(cfg)
    ckpt.load_weights(model, f"{MEMBER}/model.pt")
    dialogue = ckpt.json("corpus.json").get("dialogue", {}) if "corpus.json" in ckpt.sums else {}
    return ChatModel(model.to(device).eval(), vocab, dialogue if isinstance(dialogue, dict) else {})


def last_val_loss(ckpt: Checkpoint) -> float | None:
    """The val loss of the checkpoint's last evaluation, if it has one and it can be read (a
    page or a model card can do without it)."""
    try:
        evals = ckpt.tensors(f"{MEMBER}/train_state.pt").get("evals") or []
        if evals and "val_loss" in evals[-1]:
            return float(evals[-1]["val_loss"])
    except Exception:  # noqa: BLE001
        pass
    return None


def checkpoint_info(ckpt: Checkpoint, run_id: str) -> dict[str, Any]:
    """What the page shows of the checkpoint it serves: run, step, val loss."""
    info: dict[str, Any] = {"model": run_id, "run": run_id, "step": ckpt.step, "checkpoint": str(ckpt.path),
                            "created": int(ckpt.meta.get("saved_at", time.time()))}
    loss = last_val_loss(ckpt)
    if loss is not None:
        info["val_loss"] = loss
    return info
