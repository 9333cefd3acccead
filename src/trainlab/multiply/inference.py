"""Using what was trained: load members from a checkpoint, answer, evaluate."""

from __future__ import annotations

import re

import numpy as np
import torch

from trainlab.config import ConfigError, UsageError
from trainlab.engine.checkpoint import Checkpoint
from trainlab.engine.errors import CheckpointError
from trainlab.engine.memory import check_model_fits
from trainlab.multiply.config import MultiplyDataConfig, Seq2SeqConfig
from trainlab.multiply.data import MultiplicationDataset
from trainlab.multiply.evaluation import decode_problems
from trainlab.multiply.models import SimpleTransformer, build_model

# ASCII digits only: Python's int() also reads other scripts' digits ("٣" is 3), which would
# make "٣*٤" a problem the model never saw written that way
PROBLEM = re.compile(r"\s*([0-9]+)\s*[*xX×]\s*([0-9]+)\s*")


def load_members(ckpt: Checkpoint, device: torch.device) -> dict[str, SimpleTransformer]:
    """Every member of the checkpoint, rebuilt from its own saved model config."""
    models = {}
    names = sorted({n.split("/")[0] for n in ckpt.sums if n.endswith("/model.pt")})
    for name in names:
        cfg = ckpt.config(f"{name}/model_config.json", Seq2SeqConfig)
        check_model_fits(lambda: build_model(cfg), device, f"{ckpt.path}'s {name} model")
        model = build_model(cfg)
        ckpt.load_weights(model, f"{name}/model.pt")
        models[name] = model.to(device).eval()
    if not models:
        raise CheckpointError(f"{ckpt.path}: holds no models")
    return models


def trained_data_config(ckpt: Checkpoint) -> MultiplyDataConfig:
    return ckpt.config("config.json", MultiplyDataConfig, section="data")


def parse_problem(text: str, max_digits: int) -> tuple[int, int]:
    """``A*B`` (or ``AxB``, ``A×B``) with ASCII digits, each operand 1 to ``max_digits`` digits long."""
    shown = text if len(text) <= 40 else text[:40] + "..."
    m = PROBLEM.fullmatch(text)
    if not m:
        sign = " (operands are whole numbers from 1 up: no signs)" if re.match(r"\s*[-+]", text) else ""
        raise UsageError(f"problem: expected A*B with whole numbers in ASCII digits, e.g. 123*456, "
                         f"got {shown!r}{sign}")
    limit = 10 ** max_digits - 1
    for digits in m.groups():  # checked as text first: int() refuses over 4,300 digits with a traceback
        if len(digits.lstrip("0")) > max_digits or int(digits) < 1:
            raise UsageError(f"problem: operands must be between 1 and {limit} for this model, got "
                             f"{digits if len(digits) <= 20 else digits[:20] + '...'}")
    return int(m.group(1)), int(m.group(2))


def evaluation_dataset(trained: MultiplyDataConfig, min_digits: int | None, max_digits: int | None
                       ) -> MultiplicationDataset:
    """The trained split fractions over a (possibly narrower) digit range, padded as trained."""
    lo = trained.min_digits if min_digits is None else min_digits
    hi = trained.max_digits if max_digits is None else max_digits
    if hi > trained.max_digits:
        raise ConfigError("max_digits", f"the model was trained with at most {trained.max_digits} digits, got {hi}")
    cfg = MultiplyDataConfig(min_digits=lo, max_digits=hi, answer_order=trained.answer_order,
                             answer_pad=trained.answer_pad,
                             val_fraction=trained.val_fraction, test_fraction=trained.test_fraction)
    return MultiplicationDataset(cfg, pad_width=trained.max_digits)


def answer(models: dict[str, SimpleTransformer], dataset: MultiplicationDataset, a: int, b: int) -> dict[str, int | None]:
    idx = np.array([(a - dataset.lo) * dataset.width + (b - dataset.lo)], dtype=np.int64)
    return {name: decode_problems(m, dataset, idx).predicted[0] for name, m in models.items()}
