"""Out-of-memory recovery: micro-batches that give the same update, injected and under a real cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config
from helpers import chat_train, cli_train, made_up_text, run_dir, tb_scalars, tiny_multiply

from trainlab.engine import faults
from trainlab.engine.checkpoint import latest_checkpoint
from trainlab.engine.loop import train
from trainlab.engine.memory import MicroBatches, OutOfMemory, fastest, is_out_of_memory, micro_batch_counts, split_batch
from trainlab.engine.tracking import new_run


def test_split_batch_covers_the_batch_once_in_order():
    batch = {"x": torch.arange(10).view(10, 1), "y": torch.arange(10)}
    parts = split_batch(batch, 4)
    assert [len(p["y"]) for p in parts] == [3, 3, 2, 2]
    assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"])
    assert split_batch(batch, 1) == [batch]


def test_micro_batches_double_on_oom_and_try_fewer_after_a_calm_stretch():
    mb = MicroBatches(recover_after=3)
    mb.on_oom(batch_size=8, step=0)
    assert mb.count == 2
    for _ in range(3):
        mb.on_success()
    assert mb.count == 1 and mb.trying  # three calm steps: try the whole batch again
    mb.on_oom(8, 5)  # it does not fit: back to 2, and wait twice as long next time
    assert mb.count == 2 and mb.wait == 6
    for _ in range(5):
        mb.on_success()
    assert mb.count == 2
    mb.on_success()
    assert mb.count == 1
    mb.on_success()  # this time it fits: the wait is back to normal
    assert not mb.trying and mb.wait == 3
    for count in (2, 4, 8):
        mb.on_oom(8, 9)
        assert mb.count == count
    with pytest.raises(OutOfMemory, match="even one example at a time"):
        mb.on_oom(8, 9)
    state = mb.state_dict()
    again = MicroBatches(3)
    again.load_state_dict(state)
    assert again.state_dict() == state


def test_a_floor_keeps_the_micro_batches_asked_for_through_recovery():
    mb = MicroBatches(recover_after=2, floor=4)
    assert mb.count == 4
    mb.on_oom(16, 0)
    assert mb.count == 8
    for _ in range(10):
        mb.on_success()
    assert mb.count == 4  # back to the floor, never below
    mb.set_floor(1)
    for _ in range(4):
        mb.on_success()
    assert mb.count < 4


def test_auto_candidates_and_the_choice():
    assert micro_batch_counts(64) == [1, 2, 4, 8, 16] and micro_batch_counts(6) == [1]
    assert fastest({1: 9.0, 2: 8.1, 4: 7.4, 8: 7.7}) == 4
    assert fastest({1: 1.0, 2: 0.99}) == 1  # within the noise margin: the whole batch stays
    assert fastest({1: float("inf"), 2: 3.0}) == 2  # the whole batch did not fit


def test_micro_batch_auto_and_n_train_the_same_and_auto_is_not_timed_again_on_resume(runs_dir, tmp_path, capsys):
    corpus = tmp_path / "play.txt"
    corpus.write_text(made_up_text(), encoding="utf-8")
    flags = ["--max-steps", "4", "--dropout", "0", "--eval-every", "4", "--batch-size", "16", "--precision", "fp32"]
    assert chat_train(runs_dir, corpus, "--run-name", "whole", *flags) == 0
    assert chat_train(runs_dir, corpus, "--run-name", "four", "--micro-batch", "4", *flags) == 0
    assert chat_train(runs_dir, corpus, "--run-name", "tuned", "--micro-batch", "auto", *flags,
                      "--max-steps", "2") == 0
    assert "--micro-batch auto:" in capsys.readouterr().out
    from helpers import chat_resume

    assert chat_resume(runs_dir, "tuned", "--max-steps", "4") == 0
    assert "--micro-batch auto:" not in capsys.readouterr().out
    whole, four, auto = (latest_checkpoint(runs_dir / "chat" / n / "checkpoints") for n in ("whole", "four", "tuned"))
    assert four.tensors("gpt/train_state.pt")["micro_batches"]["count"] == 4
    assert auto.tensors("gpt/train_state.pt")["micro_batches"]["tuned"]
    for other in (four, auto):
        for k, v in whole.tensors("gpt/model.pt").items():
            torch.testing.assert_close(v, other.tensors("gpt/model.pt")[k], rtol=1e-4, atol=1e-6, msg=k)


def test_what_counts_as_out_of_memory():
    try:
        torch.empty(2**62, dtype=torch.uint8)  # the CPU allocator's own failure
    except RuntimeError as e:
        assert is_out_of_memory(e)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def train_multiply(runs_dir, name, **kw):
    cfg = tiny_train_config(runs_dir, **{"precision": "fp32", **kw})
    task, config = tiny_multiply(cfg)  # dropout 0: micro-batches cannot draw other masks
    run = new_run(cfg.runs_dir, task.name, name, "test", config)
    return train(task, cfg, run, config, echo=lambda *a: None), run


@pytest.mark.parametrize("spec, ooms, final_count", [
    ("oom=3", 1, 1),  # one failure at step 3; after 2 calm steps the whole batch fits again
    ("oom_above=3", 4, 4),  # a cap: 8 -> 4 -> 2 examples per micro-batch; tries at 4 fail again
])
def test_injected_ooms_use_every_sample_once_and_give_the_same_weights(runs_dir, monkeypatch, spec, ooms, final_count):
    plain, _ = train_multiply(runs_dir, "plain", max_steps=10, recover_after=2, log_every=1)
    monkeypatch.setenv(faults.ENV, spec)
    split, run = train_multiply(runs_dir, "split", max_steps=10, recover_after=2, log_every=1)
    for a, b in zip(plain.members, split.members):
        assert b.micro.ooms == ooms and b.micro.count == final_count, b.micro.state_dict()
        assert a.examples == b.examples == 80 and a.step == b.step == 10
        # float sums in another order: close, not equal (atol covers the latent key biases,
        # whose true gradient is zero, so Adam turns their rounding noise into ~1e-6 steps)
        for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
            torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=f"{a.name} {k}")
        assert len(a.losses) == len(b.losses) > 0  # zip would stop at the shorter one silently
        for (s1, l1), (s2, l2) in zip(a.losses, b.losses):
            assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)
    counts = [v for _, v in tb_scalars(run.dir / "simple", "health/micro_batches")]
    assert max(counts) > 1
    saved = latest_checkpoint(run.checkpoints).tensors("simple/train_state.pt")["micro_batches"]
    assert saved["ooms"] == ooms and saved["count"] == final_count


def test_chat_micro_batches_match_the_whole_batch(runs_dir, tmp_path, monkeypatch):
    corpus = tmp_path / "play.txt"
    corpus.write_text(made_up_text(), encoding="utf-8")
    flags = ["--max-steps", "4", "--dropout", "0", "--eval-every", "4", "--precision", "fp32"]
    assert chat_train(runs_dir, corpus, "--run-name", "whole", *flags) == 0
    monkeypatch.setenv(faults.ENV, "oom_above=3")
    assert chat_train(runs_dir, corpus, "--run-name", "split", *flags) == 0
    a, b = (latest_checkpoint(runs_dir / "chat" / n / "checkpoints") for n in ("whole", "split"))
    assert b.tensors("gpt/train_state.pt")["micro_batches"]["count"] == 4  # 8 -> 2 examples at a time
    for k, v in a.tensors("gpt/model.pt").items():
        torch.testing.assert_close(v, b.tensors("gpt/model.pt")[k], rtol=1e-4, atol=1e-6, msg=k)


def test_out_of_memory_one_example_at_a_time_stops_with_one_line(runs_dir, monkeypatch, capsys):
    monkeypatch.setenv(faults.ENV, "oom_above=0")
    assert cli_train(runs_dir, "--max-steps", "3", "--run-name", "full") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "out of memory at step 1 even one example at a time" in err and "--grad-checkpointing" in err
    assert json.loads((run_dir(runs_dir, "full") / "run.json").read_text())["status"] == "failed"


def test_memory_figures_reach_tensorboard(runs_dir):
    assert cli_train(runs_dir, "--max-steps", "4", "--log-every", "2", "--run-name", "mem") == 0
    rss = tb_scalars(run_dir(runs_dir, "mem") / "simple", "memory/rss_mib")
    assert [s for s, _ in rss] == [2, 4] and all(50 < v < 100_000 for _, v in rss)


CAPPED = r"""
import resource, sys
from trainlab.cli import main

runs, text = sys.argv[1], sys.argv[2]
flags = ["chat", "train", "--text", text, "--runs-dir", runs, "--preset", "chatgot-tiny", "--no-progress",
         "--tag", "test", "--device", "cpu", "--context-len", "64", "--d-model", "64", "--nhead", "4",
         "--dropout", "0", "--eval-batches", "1", "--eval-every", "1000", "--save-every", "1000"]
# a first small run creates the threads, allocator arenas and lazy imports before the cap
assert main(flags + ["--batch-size", "8", "--max-steps", "1", "--run-name", "warm"]) == 0
size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (size + 100 * 2**20, resource.RLIM_INFINITY))
sys.exit(main(flags + ["--batch-size", "512", "--max-steps", "3", "--run-name", "capped"]))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize from /proc (Linux)")
def test_a_run_under_a_real_address_space_cap_completes(runs_dir, tmp_path):
    """512 windows of 64 characters need several hundred MiB of activations; the process
    gets 100 MiB more address space than it has after warming up, so the CPU allocator
    fails for real, and the run finishes in micro-batches."""
    corpus = tmp_path / "play.txt"
    corpus.write_text(made_up_text(2000), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    env.pop(faults.ENV, None)
    p = subprocess.run([sys.executable, "-c", CAPPED, str(runs_dir), str(corpus)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "out of memory; the batch of 512 now runs as" in p.stdout
    ck = latest_checkpoint(runs_dir / "chat" / "capped" / "checkpoints")
    assert ck.step == 3 and ck.tensors("gpt/train_state.pt")["micro_batches"]["count"] > 1


def test_counting_a_models_parameters_fills_nothing_and_imports_no_compiler():
    """The count builds the model on the meta device: its initialisation fills nothing there,
    so the count matches the real model's and torch's compiler stack (1.2 s to import) stays
    unloaded. A fresh process, since this one may have imported it already."""
    code = ("import sys, torch\n"
            "from trainlab.engine.memory import parameter_count\n"
            "from trainlab.chat.model import GPT\n"
            "from trainlab.chat.config import GPTConfig\n"
            "from trainlab.multiply.models import build_model\n"
            "from trainlab.multiply.config import Seq2SeqConfig\n"
            "cfg = GPTConfig(vocab_size=65, d_model=64, nhead=4, num_layers=2, pair_embedding=True)\n"
            "n = parameter_count(lambda: GPT(cfg))\n"
            "m = parameter_count(lambda: build_model(Seq2SeqConfig(kind='latent', num_latent=4)))\n"
            "assert 'torch._dynamo' not in sys.modules, 'the count imported torch._dynamo'\n"
            "print(n, sum(p.numel() for p in GPT(cfg).parameters()), m,"
            " sum(p.numel() for p in build_model(Seq2SeqConfig(kind='latent', num_latent=4)).parameters()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert out.returncode == 0, out.stderr
    n, real, m, real_m = map(int, out.stdout.split())
    assert n == real > 0 and m == real_m > 0
