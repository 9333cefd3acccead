"""The checkout stays small enough to carry (the GPU machine used for checks takes at most 64
MiB of working tree): no tracked file over 5 MB, all of them together under 30 MB, and no run
output tracked outside ``results/`` (which holds no checkpoints)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000


def tracked() -> dict[str, int]:
    """{path: bytes} of every file git tracks in this checkout."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    assert out.returncode == 0, "the tests run in a git checkout of trainlab (git ls-files failed)"
    names = [n for n in out.stdout.decode().split("\0") if n]
    return {n: (ROOT / n).stat().st_size for n in names if (ROOT / n).is_file()}


def test_no_tracked_file_is_large_and_the_whole_is_small():
    sizes = tracked()
    assert sizes, "git tracks no file here"
    big = {n: s for n, s in sizes.items() if s > 5 * MB}
    assert not big, f"tracked files over 5 MB: {big}"
    assert sum(sizes.values()) <= 30 * MB, f"tracked files add up to {sum(sizes.values()) / MB:.1f} MB"


def test_no_checkpoint_or_run_output_is_tracked():
    run_files = ("meta.json", "trainer.pt", "model.pt", "run.json", ".lock")
    bad = [n for n in tracked() if n.endswith(run_files) or "/step_" in n or n.startswith("runs")
           or "events.out.tfevents" in n]
    assert not bad, f"run output tracked (it belongs under runs/, which is ignored): {bad[:5]}"


def test_the_license_is_mit_in_the_file_and_the_package_metadata():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert meta["license"] == "MIT" and meta["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "the trainlab authors" in text


def test_a_benchmarks_scratch_runs_are_removed_when_it_exits_even_on_an_error(tmp_path):
    """Benchmarks train in scratch runs folders: left in /tmp, they had piled up to 39 GB on the
    development machine. A benchmark's folder goes when it exits (here: by an error), unless
    TRAINLAB_KEEP_SCRATCH asks to keep it."""
    import os
    import sys

    script = ("import os, sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
              "from common import scratch_dir\n"
              "a = scratch_dir('scratch-test-'); open(os.path.join(a, 'ckpt.pt'), 'wb').write(b'x' * 1000)\n"
              "os.environ['TRAINLAB_KEEP_SCRATCH'] = '1'\n"
              "b = scratch_dir('scratch-test-')\n"
              "print(a); print(b, flush=True)\n"
              "raise RuntimeError('the benchmark failed')\n")
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("TRAINLAB_KEEP_SCRATCH", None)
    p = subprocess.run([sys.executable, "-c", script, str(ROOT / "benchmarks"), str(ROOT / "src")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "the benchmark failed" in p.stderr
    removed, kept = (Path(line) for line in p.stdout.split())
    assert removed.parent == tmp_path and not removed.exists()
    assert kept.is_dir() and "kept in" in p.stderr


def test_no_benchmark_makes_a_temporary_folder_it_does_not_remove():
    """Every scratch folder of the benchmarks comes from common.scratch_dir (removed at exit)."""
    offenders = [p.name for p in sorted((ROOT / "benchmarks").glob("*.py"))
                 if p.name != "common.py" and "mkdtemp(" in p.read_text(encoding="utf-8")]
    assert not offenders, f"benchmarks that leave temporary folders behind: {offenders}"
