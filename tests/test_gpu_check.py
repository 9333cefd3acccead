"""benchmarks/gpu_check.py at its CPU size: every part runs and reports, so the GPU check
cannot rot before a GPU comes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from helpers import link_suite_kernels, made_up_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check

        yield gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_every_part_runs_on_a_cpu_and_writes_its_figures(gpu_check, tmp_path, monkeypatch):
    text = tmp_path / "play.txt"
    text.write_text(made_up_text(3000), encoding="utf-8")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "check"
    # the serving part's row kernels: the suite's build, linked in. Built here, they took 70 s on a
    # 2-core AVX2 EPYC, past the part's cap of 60 s
    runs = tmp_path / "runs"
    link_suite_kernels(runs)
    code = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), "--text", str(text),
                           "--runs-dir", str(runs)])
    result = json.loads((out / "results.json").read_text())
    parts = result["parts"]
    assert list(parts) == [name for name, _ in gpu_check.PARTS]
    assert code == 0, {k: v.get("error") for k, v in parts.items() if "error" in v}
    assert "cpu" in result["machine"] and "torch" in result["machine"]
    n = parts["nanogpt_settings"]
    assert sorted(n["val_loss_by_step"]) == ["10", "20"] and n["whole_span"] > 0
    # the two smallest: which one depends on this machine's pace (chat-1min from 0.6M characters)
    assert parts["best_recipe"]["chose"] in ("chat-quick", "chat-1min") and parts["best_recipe"]["whole_span"] > 0
    t = parts["throughput"]
    assert t["speed-eager"]["chars_per_sec"] > 0 and "speed-compiled" not in t  # compiling: its own test
    assert t["nanogpt"] == "not given"
    assert parts["kill_resume"]["plain"]["bit_identical"] is True and parts["kill_resume"]["plain"]["killed_exit"] != 0
    assert parts["precisions"]["fp32"]["ran_in"] == "fp32" and parts["precisions"]["auto"]["last_train_loss"] > 0
    assert parts["torchrun"]["same_steps"] and parts["torchrun"]["max_loss_diff"] == 0.0
    assert parts["serve"]["eight_streams_chars_per_sec_each"] > 0 and parts["serve"]["chars"] == [40] * 8
    assert parts["export"]["same_greedy_text"] is True
    assert (out / "log.txt").read_text().count("== ") == len(parts)


def test_a_server_that_does_not_come_up_in_time_is_stopped_and_reported_not_waited_on(gpu_check, tmp_path,
                                                                                      monkeypatch):
    """The serving part stops a server still starting at its deadline and says what it printed:
    reading a live server's output first waited forever (the suite hung behind a kernels' build)."""
    popen = gpu_check.subprocess.Popen

    def starting_forever(cmd, **kw):  # a server that is still building when the cap comes
        return popen([sys.executable, "-c", "import time; print('still building', flush=True); time.sleep(300)"], **kw)

    monkeypatch.setattr(gpu_check.subprocess, "Popen", starting_forever)
    args = gpu_check.argparse.Namespace(device="cpu", tiny=True, out=str(tmp_path / "out"), runs_dir=None)
    c = gpu_check.Check(args)
    c.deadline = time.monotonic() + 1.0
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="did not come up in .*still building"):
        gpu_check.serve(c)
    assert time.monotonic() - t < 30
