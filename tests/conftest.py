"""Shared fixtures: every run a test makes lives in a temporary folder and is tagged 'test';
at the end of the session the suite removes them with the same code `trainlab runs clean
--tests` uses, and checks that none is left."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainlab.engine.loop import TrainConfig

RUNS_DIRS: list[Path] = []


def register_runs_dir(path: Path) -> Path:
    RUNS_DIRS.append(Path(path))
    return Path(path)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _clean_test_runs_at_the_end():
    yield
    from trainlab.engine.tracking import clean_test_runs, select_test_runs

    for d in RUNS_DIRS:
        if d.is_dir():
            clean_test_runs(d)
            left = select_test_runs(d)
            assert not left, f"test runs left behind in {d}: {[r.key for r in left]}"


@pytest.fixture
def runs_dir(tmp_path):
    yield register_runs_dir(tmp_path / "runs")


def tiny_train_config(runs_dir, **kw) -> TrainConfig:
    base = dict(max_steps=6, batch_size=8, eval_every=1000, save_every=1000, log_every=2, warmup_steps=2,
                runs_dir=str(runs_dir), tag="test", progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)
