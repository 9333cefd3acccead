"""Shared fixtures: every run a test makes lives in a temporary folder and is tagged 'test'."""

from __future__ import annotations

import pytest
import torch

from trainlab.engine.loop import TrainConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def runs_dir(tmp_path):
    d = tmp_path / "runs"
    yield d


def tiny_train_config(runs_dir, **kw) -> TrainConfig:
    base = dict(max_steps=6, batch_size=8, eval_every=1000, save_every=1000, log_every=2, warmup_steps=2,
                runs_dir=str(runs_dir), tag="test", progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)
