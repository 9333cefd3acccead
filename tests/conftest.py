"""Shared fixtures: every run a test makes lives in a temporary folder and is tagged 'test';
at the end of the session the suite removes them with the same code `trainlab runs clean
--tests` uses, and checks that none is left.

Precision: ``--precision auto`` times fp32 against bf16 on CPUs with native bf16, so what
it picks depends on the machine and the moment. Tests must not, so the suite makes
``auto`` resolve to fp32 (``TRAINLAB_AUTO_PRECISION``, the engine's documented hook)
unless the environment already sets it. ``make test`` then runs the modules marked
``precision`` a second time with ``TRAINLAB_AUTO_PRECISION=bf16``: what a machine whose
``auto`` picks bf16 (AMX, say) runs, checked on any machine. The timing itself is
tested in test_precision.py, with a stubbed clock and once for real."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trainlab.engine.precision import AUTO_ENV

os.environ.setdefault(AUTO_ENV, "fp32")  # before any run; subprocesses (torchrun) inherit it

from trainlab.engine.loop import TrainConfig  # noqa: E402

# modules whose runs train under --precision auto and check what it does: run again with auto
# forced to bf16. Left out: test_learning (80 s in bf16 on an AVX2-only CPU, and
# test_precision's bf16 run against fp32 already checks that bf16 learns); test_distributed
# and test_speed (they compare two paths, so they pin fp32 and the second pass would repeat
# them); the model and runs-index modules (nothing in them goes through auto).
PRECISION_SENSITIVE = {"test_chat_task", "test_engine", "test_memory", "test_monitor", "test_precision",
                       "test_resume"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in PRECISION_SENSITIVE:
            item.add_marker(pytest.mark.precision)

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
