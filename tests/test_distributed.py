"""DDP under torchrun, on CPU with 2 processes (gloo): the same global batch gives the same
training as one process, decisions are agreed across ranks, and resume works. Both sides
run in fp32: the comparison is of numbers, at fp32 tolerances."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref

import torch
from conftest import tiny_train_config
from helpers import CHAT_TINY, TINY, chat_train, cli_train, made_up_text, tiny_multiply

from trainlab.engine import faults
from trainlab.engine.checkpoint import latest_checkpoint
from trainlab.engine.distributed import Dist, shard

MULTIPLY = ["--max-digits", "2", "--batch-size", "16", "--max-steps", "8", "--log-every", "1", "--eval-every", "4",
            "--save-every", "4", "--dropout", "0", "--seq-weight", "1.0", "--precision", "fp32"]
CHAT = ["--max-steps", "8", "--log-every", "1", "--eval-every", "4", "--save-every", "4", "--dropout", "0",
        "--precision", "fp32"]


def torchrun(*args: str, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", faults.ENV: fault}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "trainlab", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def assert_same_training(a, b, members):
    """Same loss at every step and the same final weights, to float tolerance."""
    assert a.step == b.step
    for m in members:
        la, lb = (c.tensors(f"{m}/train_state.pt")["losses"] for c in (a, b))
        assert [s for s, _ in la] == [s for s, _ in lb]
        torch.testing.assert_close(torch.tensor([v for _, v in la]), torch.tensor([v for _, v in lb]),
                                   rtol=1e-5, atol=1e-6)
        wa, wb = (c.tensors(f"{m}/model.pt") for c in (a, b))
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6, msg=k)


def test_shard_gives_each_rank_a_disjoint_slice():
    batch = {"x": torch.arange(10)}
    parts = [shard(batch, Dist(rank=r, world=3))["x"].tolist() for r in range(3)]
    assert sum(parts, []) == list(range(10)) and [len(p) for p in parts] == [4, 3, 3]
    assert shard(batch, Dist())["x"] is batch["x"]


def test_the_training_wrapper_is_released_when_the_run_ends(runs_dir, monkeypatch):
    # DDP's wrapper holds the process group; one that outlived the run (in the summary the CLI
    # keeps) let gloo's group die in the interpreter's shutdown, which aborted rank 1 now and then
    from trainlab.engine import loop
    from trainlab.engine.tracking import new_run

    wrappers = []

    def stand_in(model, device, d):
        w = torch.nn.ModuleDict({"module": model})  # DDP's place, without a process group
        w.forward = model.forward
        wrappers.append(weakref.ref(w))
        return w

    monkeypatch.setattr(loop, "wrap", stand_in)
    cfg = tiny_train_config(runs_dir)
    task, config = tiny_multiply(cfg)
    summary = loop.train(task, cfg, new_run(cfg.runs_dir, task.name, "wrapped", "test", config), config,
                         echo=lambda *a: None)
    assert len(wrappers) == len(summary.members) == 2
    assert all(m.ddp is m.model for m in summary.members)
    gc.collect()
    assert all(w() is None for w in wrappers)


def test_multiply_on_two_processes_matches_one_and_agrees_on_faults(runs_dir, monkeypatch):
    # one process: an out-of-memory at step 3 and a NaN loss at step 5
    monkeypatch.setenv(faults.ENV, "oom=3,nonfinite=5")
    assert cli_train(runs_dir, "--run-name", "one", *MULTIPLY) == 0
    # two processes: the same faults on rank 1 only; rank 0 must follow it
    p = torchrun("multiply", "train", "--runs-dir", str(runs_dir), *TINY, "--run-name", "two", *MULTIPLY,
                 fault="oom=3,nonfinite=5,rank=1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "training on 2 processes" in p.stdout
    one, two = (latest_checkpoint(runs_dir / "parallel_comparison" / n / "checkpoints") for n in ("one", "two"))
    assert_same_training(one, two, ["simple", "latent"])
    for m in ("simple", "latent"):
        state = two.tensors(f"{m}/train_state.pt")  # rank 0's own record, of faults it never had
        assert state["micro_batches"]["count"] == 2 and state["micro_batches"]["ooms"] == 1
        assert state["health"]["skipped_nonfinite"] == 1 and state["step"] == 7
    trainer = two.tensors("trainer.pt")
    assert len(trainer["rng_ranks"]) == 2


def test_chat_on_two_processes_matches_one_across_a_resume(runs_dir, tmp_path):
    corpus = tmp_path / "play.txt"
    corpus.write_text(made_up_text(), encoding="utf-8")
    assert chat_train(runs_dir, corpus, "--run-name", "one", *CHAT) == 0
    # rank 1 alone is interrupted at step 5: every rank stops there, rank 0 saves
    p = torchrun("chat", "train", "--text", str(corpus), "--runs-dir", str(runs_dir), *CHAT_TINY,
                 "--run-name", "two", *CHAT, fault="interrupt=5,rank=1")
    assert p.returncode != 0 and "interrupted at step 5" in p.stdout, p.stderr[-3000:]  # torchrun: 1 for 130
    assert latest_checkpoint(runs_dir / "chat" / "two" / "checkpoints").step == 5
    p = torchrun("chat", "train", "--resume", "two", "--runs-dir", str(runs_dir), "--no-progress", "--tag", "test")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming run two from step 5" in p.stdout
    one, two = (latest_checkpoint(runs_dir / "chat" / n / "checkpoints") for n in ("one", "two"))
    assert_same_training(one, two, ["gpt"])


def test_saved_cuda_rng_states_go_to_the_devices_present(monkeypatch):
    """A run saved with two GPUs visible resumes with one (or three): each present device gets
    its own saved state, none raises (set_rng_state_all would, with fewer devices)."""
    from trainlab.engine import state as st

    saved = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(saved))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((int(state[0]), device)))

    def all_or_nothing(states):
        raise RuntimeError("set_rng_state_all needs a state for each device present")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", all_or_nothing)
    state = st.rng_state()
    assert [int(s[0]) for s in state["cuda"]] == [1, 2]
    for present, expected in ((1, [(1, 0)]), (3, [(1, 0), (2, 1)]), (2, [(1, 0), (2, 1)])):
        calls.clear()
        monkeypatch.setattr(torch.cuda, "device_count", lambda: present)
        st.set_rng_state(state)
        assert calls == expected, present


def test_a_retried_or_timed_pass_rewinds_the_gpu_rng_too(monkeypatch):
    """What step.py rewinds before an out-of-memory retry or after the start-of-run timing:
    the CPU RNG and, on CUDA, the device's own, so dropout draws the same masks there too."""
    from trainlab.engine.device import rewind_rng, rng_point

    gpu = {"state": torch.tensor([7], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: gpu["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: gpu.update(state=state, device=device))
    cuda = torch.device("cuda", 0)
    point = rng_point(cuda)
    first = torch.rand(4)
    gpu["state"] = torch.tensor([9], dtype=torch.uint8)  # the pass drew from the device's generator
    rewind_rng(point, cuda)
    assert torch.equal(torch.rand(4), first)
    assert int(gpu["state"][0]) == 7 and gpu["device"] == cuda
    assert rng_point(torch.device("cpu"))[1] is None  # a CPU run has no device generator to keep


def test_a_time_budget_under_torchrun_is_rank_zeros_for_every_rank(runs_dir):
    """Each rank measures its own pace; rank 0's fit is broadcast, so both train the same steps
    (ranks that disagreed would hang in a collective or end at different steps)."""
    import json

    p = torchrun("multiply", "train", "--runs-dir", str(runs_dir), *TINY, "--run-name", "budget", "--max-digits", "2",
                 "--batch-size", "16", "--minutes", "0.3", "--warmup-steps", "5", "--precision", "fp32")
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads((runs_dir / "parallel_comparison" / "budget" / "run.json").read_text())
    steps = info["max_steps"]
    assert info["status"] == "finished" and info["step"] == steps and info["budget"]["fits"][0]["kind"] == "fit"
    assert latest_checkpoint(runs_dir / "parallel_comparison" / "budget" / "checkpoints").step == steps
    assert p.stdout.count("budget 0.3 min: fitted") == 1  # one voice: rank 0's
