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
