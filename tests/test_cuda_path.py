"""What the CUDA path does differently, checked on the CPU where it can be: TF32 for fp32
matmuls, the device waits of a step, batches made ahead, one-token attention without a mask."""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from helpers import chat_train, made_up_text

from trainlab.engine.batches import Batches
from trainlab.engine.device import set_fp32_matmul


def test_tf32_is_set_only_on_cuda_and_can_be_turned_off():
    before = torch.get_float32_matmul_precision()
    try:
        assert set_fp32_matmul(torch.device("cpu"), True) is None
        assert torch.get_float32_matmul_precision() == before  # a CPU's matmuls are left alone
        assert set_fp32_matmul(torch.device("cuda"), True) == "tf32"  # only flags: no CUDA needed to set them
        assert torch.get_float32_matmul_precision() == "high"
        assert set_fp32_matmul(torch.device("cuda"), False) == "fp32"
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)


def test_batches_made_ahead_are_the_batches_of_their_steps():
    def make(step):
        g = torch.Generator().manual_seed(step)
        return {"x": torch.randint(0, 9, (4, 3), generator=g)}

    asked = []
    ahead = Batches(lambda step: (asked.append(step), make(step))[1], torch.device("cpu"), prefetch=True)
    try:
        # in order, then a jump (a resume, or a rollback): each step gets its own batch
        for step in [0, 1, 2, 7, 8, 3]:
            assert torch.equal(ahead(step)["x"], make(step)["x"])
            assert ahead._ahead is not None and ahead._ahead[0] == step + 1  # the next one is on its way
        ahead._ahead[1].result()
    finally:
        ahead.close()
    # steps 1, 2 and 8 came from the side thread, made once; 7 and 3 were made when asked
    assert sorted(asked) == sorted([0, 1, 2, 3, 7, 8, 9, 3, 4])
    plain = Batches(make, torch.device("cpu"))
    assert plain.prefetch is False  # two cores: no side thread on a CPU


def count_waits(monkeypatch) -> dict[str, int]:
    """Every .tolist()/.item() of a device tensor and every synchronize from trainlab's code
    is a wait on a GPU: counted."""
    import trainlab.engine.device as device_mod

    waits = {"n": 0}
    for name in ("tolist", "item"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            if "trainlab" in sys._getframe(1).f_code.co_filename:
                waits["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    real_sync = device_mod.synchronize
    monkeypatch.setattr(device_mod, "synchronize", lambda d: (waits.__setitem__("n", waits["n"] + 1), real_sync(d)))
    return waits


def test_a_quiet_step_never_waits_for_the_device(tmp_path, monkeypatch):
    """A step that neither logs, evaluates, samples nor saves makes no wait: its skip is
    decided on the device (``optim.masked_step``) and its loss read at the next log step.
    With ``--on-spike skip`` the spike check needs each loss before the update: one wait."""
    text = tmp_path / "play.txt"
    text.write_text(made_up_text(), encoding="utf-8")
    waits = count_waits(monkeypatch)
    steps = {}
    for spike in ("log", "skip"):
        for n in (10, 30):
            waits["n"] = 0
            assert chat_train(tmp_path / "runs", text, "--max-steps", str(n), "--eval-every", "1000", "--log-every",
                              "1000", "--save-every", "1000", "--sample-every", "0", "--run-name", f"w{spike}{n}",
                              "--precision", "fp32", "--on-spike", spike) == 0
            steps[spike, n] = waits["n"]
    # set-up and the end are the same in both runs; the 20 steps between cost nothing, or one wait each
    assert steps["log", 30] - steps["log", 10] == 0
    assert steps["skip", 30] - steps["skip", 10] == 20


def test_the_host_learns_a_skip_at_the_next_read_and_counts_it_there(runs_dir, monkeypatch, capsys):
    """Steps 3 and 4 are poisoned in a run that reads every 5 steps: the device skipped them
    and the read at step 5 counts them, says so with their own step numbers, and keeps them out of the loss."""
    from helpers import tb_scalars
    from test_precision import run_tiny

    summary, run, _, _ = run_tiny(runs_dir, "late", "nonfinite=3,nonfinite_grad=4", monkeypatch, max_steps=10,
                                      log_every=5)
    (m,) = summary.members
    lines = capsys.readouterr().out.splitlines()
    assert m.step == 8 and m.health.skipped_nonfinite == 2
    assert [line for line in lines if "skipped" in line] == ["[step 3] simple: spike, loss is nan; update skipped",
                                                              "[step 4] simple: gradient norm inf; update skipped"]
    assert [s for s, _ in tb_scalars(run.dir / "simple", "health/skipped_nonfinite")] == [5, 10]
    assert [v for _, v in tb_scalars(run.dir / "simple", "health/skipped_nonfinite")] == [2.0, 2.0]
    assert all(math.isfinite(v) for _, v in tb_scalars(run.dir / "simple", "train/loss"))
    assert m.scheduler.last_epoch == 10  # the schedule followed the batches: the run ends at its final LR


def test_one_new_token_attends_without_a_mask(monkeypatch):
    from trainlab.chat.config import GPTConfig
    from trainlab.chat.model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(d_model=32, nhead=2, num_layers=1, context_len=16, dropout=0.0, vocab_size=11,
                          positions="rotary")).eval()
    masks = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        full, _ = model(x)
        _, cache = model(x[:, :8])
        masks.clear()
        step, _ = model(x[:, 8:], cache)
    assert masks == [None]
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
