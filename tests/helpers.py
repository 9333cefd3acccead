"""Small builders shared by tests."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from trainlab.engine.train_config import TrainConfig
from trainlab.multiply.config import (
    LossConfig,
    MultiplyDataConfig,
    MultiplyTaskConfig,
    Seq2SeqConfig,
    TeacherForcingConfig,
)
from trainlab.multiply.task import MultiplyTask


def tiny_multiply(train: TrainConfig, min_digits=1, max_digits=1, tf=None, **model_kw):
    data = MultiplyDataConfig(min_digits=min_digits, max_digits=max_digits)
    model = Seq2SeqConfig(**{**dict(d_model=32, nhead=4, num_layers=1, num_latent=2), **model_kw})
    task = MultiplyTask(data, model, LossConfig(), tf or TeacherForcingConfig(), MultiplyTaskConfig(eval_samples=50), train)
    config = {"data": asdict(data), "model": asdict(model), "train": asdict(train)}
    return task, config


# -- command-line runs and what they leave ------------------------------------------------
# the serving row kernels (chat/kernels.py), built once for the whole suite: every test process
# loads the same folder, and torch's build lock makes a second process wait for the first
KERNELS_ROOT = Path(__file__).resolve().parents[1] / "build" / "test-kernels"


def link_suite_kernels(runs_dir: Path) -> None:
    """Make a runs folder's ``.compiled`` row kernels the suite's build (built here if this
    checkout has none yet), so a server or generate started on it loads them instead of building
    its own: a build takes 25-50 s on a 2-core AVX-512-BF16 EPYC and 62-85 s on an AVX2 one."""
    from trainlab.chat.kernels import kernels_dir, load_kernels

    assert load_kernels(KERNELS_ROOT)[0] is not None
    linked = kernels_dir(runs_dir / ".compiled")
    if not linked.exists():
        linked.parent.mkdir(parents=True, exist_ok=True)
        linked.symlink_to(kernels_dir(KERNELS_ROOT), target_is_directory=True)


TINY = ["--d-model", "32", "--num-layers", "1", "--num-latent", "2", "--batch-size", "8", "--eval-samples", "20",
        "--test-n", "200",  # the report scores 200 held-out problems, not 10,000: seconds a run, over hundreds
        "--no-progress", "--tag", "test", "--device", "cpu"]


def cli_train(runs, *flags) -> int:
    from trainlab.cli import main

    return main(["multiply", "train", "--runs-dir", str(runs), *TINY, *flags])


def run_dir(runs, name):
    return runs / "parallel_comparison" / name


def final_state(runs, name):
    """{file: loaded object} of every tensor file in the run's newest checkpoint."""
    from trainlab.engine.checkpoint import latest_checkpoint

    ck = latest_checkpoint(run_dir(runs, name) / "checkpoints")
    return ck.step, {n: ck.tensors(n) for n in ck.sums if n.endswith(".pt") and n != "trainer.pt"}


def same_training(runs, a, b):
    """Weights, optimizer and scheduler state and loss history identical (wall times aside)."""
    step_a, state_a = final_state(runs, a)
    step_b, state_b = final_state(runs, b)
    assert step_a == step_b
    for name in state_a:
        x, y = state_a[name], state_b[name]
        if name.endswith("train_state.pt"):
            kept = ("optimizer", "scheduler", "step", "examples", "losses", "average")
            x = {k: v for k, v in x.items() if k in kept}
            y = {k: v for k, v in y.items() if k in kept}
        assert_same_tensors(x, y, name)


def assert_same_tensors(a, b, where=""):
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def tb_scalars(folder, tag):
    """[(step, value)] of one tag, read back by TensorBoard's own reader (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# -- chat ------------------------------------------------------------------------------------
def made_up_text(lines: int = 300, seed: int = 0) -> str:
    """A small invented play in block style: a few speakers, a few fixed lines each."""
    import random

    rng = random.Random(seed)
    speech = {"ANNA": ["The boat is late again.", "We sail at noon."],
              "BORIS": ["Bring the red lamp.", "Nobody saw the fox."],
              "CLARA": ["I will count the apples.", "Is the door shut?"]}
    out = []
    for _ in range(lines):
        name = rng.choice(sorted(speech))
        out.append(f"{name}:\n{rng.choice(speech[name])}\n\n")
    return "".join(out)


CHAT_TINY = ["--preset", "chatgot-tiny", "--no-progress", "--tag", "test", "--device", "cpu"]


def chat_train(runs, text_path, *flags) -> int:
    from trainlab.cli import main

    return main(["chat", "train", "--text", str(text_path), "--runs-dir", str(runs), *CHAT_TINY, *flags])


def trained_play(tmp_path_factory, folder: str, *flags: str):
    """A runs folder with a tiny chat model (run "srv") trained on a made-up play with ``flags``."""
    from conftest import register_runs_dir

    tmp = tmp_path_factory.mktemp(folder)
    runs = register_runs_dir(tmp / "runs")
    corpus = tmp / "play.txt"
    corpus.write_text(made_up_text(), encoding="utf-8")
    assert chat_train(runs, corpus, "--run-name", "srv", *flags) == 0
    return runs


def chat_resume(runs, ref, *flags) -> int:
    """Resume with no preset: a preset given on resume would count as flags against the run's own."""
    from trainlab.cli import main

    return main(["chat", "train", "--resume", ref, "--runs-dir", str(runs), "--no-progress", "--tag", "test", *flags])
