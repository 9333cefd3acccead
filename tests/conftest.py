"""Shared fixtures: every run a test makes lives in a temporary folder and is tagged 'test';
at the end of the session the suite removes them with the same code `trainlab runs clean
--tests` uses, and checks that none is left.

Precision: ``--precision auto`` times fp32 against bf16 on CPUs with native bf16, so what
it picks depends on the machine and the moment. Tests must not, so the suite makes
``auto`` resolve to fp32 (``TRAINLAB_AUTO_PRECISION``, the engine's documented hook)
unless the environment already sets it.

``make test`` then runs again, with ``TRAINLAB_AUTO_PRECISION=bf16``, exactly the tests
whose runs took ``auto``: what a machine whose ``auto`` picks bf16 (AMX, say) runs,
checked on any machine. Which tests those are is seen, not listed by hand: the first pass
(``--record-auto-tests FILE``) writes the id of every test that built a member with
``precision auto``; the second (``--only-auto-tests FILE``) runs those alone and fails any
of them in which no member ran bf16, so the pass tests what it says. A test that pins its
precision (two paths compared in fp32, say) is not in it. The timing itself is tested in
test_precision.py, with a stubbed clock and once for real."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trainlab.engine import precision as engine_precision
from trainlab.engine.precision import AUTO_ENV

os.environ.setdefault(AUTO_ENV, "fp32")  # before any run; subprocesses (torchrun) inherit it
SESSION_AUTO = os.environ[AUTO_ENV]  # a test that sets its own (the timing tests) is not the pass's business

from trainlab.engine.train_config import TrainConfig  # noqa: E402

# the members each test built in this process that took auto as the session forces it: what it gave
BUILT: list[str] = []
_made = engine_precision.Precision.__init__


def _recording_init(self, requested, device):  # an observer for the two passes, not a change of behaviour
    _made(self, requested, device)
    if requested == "auto" and os.environ.get(AUTO_ENV) == SESSION_AUTO:
        BUILT.append(self.candidates[0] if len(self.candidates) == 1 else "timed")


engine_precision.Precision.__init__ = _recording_init
AUTO_TESTS: set[str] = set()  # filled from the reports: under pytest-xdist the tests run in workers
AUTO_MARK = "trained_under_auto"


def pytest_addoption(parser):
    parser.addoption("--record-auto-tests", metavar="FILE", help="write the ids of tests that trained under auto")
    parser.addoption("--only-auto-tests", metavar="FILE", help="run only these tests; each must run bf16 "
                                                               "(with TRAINLAB_AUTO_PRECISION=bf16)")


def pytest_collection_modifyitems(config, items):
    path = config.getoption("--only-auto-tests")
    if not path:
        return
    if os.environ.get(AUTO_ENV) != "bf16":
        raise pytest.UsageError(f"--only-auto-tests is the bf16 pass: set {AUTO_ENV}=bf16")
    wanted = set(Path(path).read_text(encoding="utf-8").split("\0")) - {""}
    if not wanted:
        raise pytest.UsageError(f"{path} names no test: run the first pass with --record-auto-tests")
    config.hook.pytest_deselected(items=[i for i in items if i.nodeid not in wanted])
    items[:] = [i for i in items if i.nodeid in wanted]


@pytest.fixture(autouse=True)
def _precision_pass(request):
    BUILT.clear()
    yield
    if BUILT:  # on the report, so the controller of `pytest -n` sees it too
        request.node.user_properties.append((AUTO_MARK, True))
    if request.config.getoption("--only-auto-tests"):
        assert "bf16" in BUILT, f"in the bf16 pass, but no member ran bf16 under auto: {BUILT}"


def pytest_runtest_logreport(report):
    if (AUTO_MARK, True) in report.user_properties:
        AUTO_TESTS.add(report.nodeid)


def pytest_sessionfinish(session):
    path = session.config.getoption("--record-auto-tests")
    # the controller, or a run without workers; NUL-separated: parametrised ids may hold any other character
    if path and not hasattr(session.config, "workerinput"):
        Path(path).write_text("\0".join(sorted(AUTO_TESTS)), encoding="utf-8")


RUNS_DIRS: list[Path] = []


def register_runs_dir(path: Path) -> Path:
    RUNS_DIRS.append(Path(path))
    return Path(path)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_inside_pytests_folder(tmp_path_factory):
    """What the tests' processes put in the temporary folder (torchrun's folders, Chromium's
    profiles, benchmarks' scratch runs) goes inside pytest's own, which pytest prunes after a few
    sessions: in /tmp it stayed, about 40 folders a suite. Inductor's compile cache stays where it
    was, so compiling tests find it warm."""
    import getpass
    import tempfile

    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR",
                              str(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"))
    inside = str(tmp_path_factory.mktemp("tmp", numbered=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", inductor)
        mp.setenv("TMPDIR", inside)
        mp.setattr(tempfile, "tempdir", inside)
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
