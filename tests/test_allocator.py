"""allocator.py: the command starts itself again with tcmalloc where the machine has it, and
only then; what it starts does not inherit the preload."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainlab import allocator

SRC = Path(__file__).resolve().parents[1] / "src"


def test_it_finds_a_library_in_the_folders_it_searches(tmp_path):
    assert allocator.find_tcmalloc((str(tmp_path),)) is None
    (tmp_path / "libtcmalloc.so.4").write_bytes(b"")
    assert allocator.find_tcmalloc((str(tmp_path),)) == str(tmp_path / "libtcmalloc.so.4")
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")  # the minimal one first: no profiler inside
    assert allocator.find_tcmalloc((str(tmp_path / "none"), str(tmp_path))).endswith("libtcmalloc_minimal.so.4")


def test_it_restarts_only_on_linux_with_a_library_and_nothing_preloaded():
    lib = "/usr/lib/libtcmalloc_minimal.so.4"
    env = allocator.restart_env({"PATH": "/bin"}, lib, "linux")
    assert env == {"PATH": "/bin", "LD_PRELOAD": lib, allocator.PRELOADED: "1"}
    assert allocator.restart_env({}, None, "linux") is None  # no library
    assert allocator.restart_env({}, lib, "darwin") is None
    assert allocator.restart_env({"TRAINLAB_MALLOC": "system"}, lib, "linux") is None  # the user's choice
    assert allocator.restart_env({"LD_PRELOAD": "/opt/profiler.so"}, lib, "linux") is None  # someone else's preload
    assert allocator.restart_env({allocator.PRELOADED: "1", "LD_PRELOAD": lib}, lib, "linux") is None  # restarted


PROBE = ("import os, sys; from trainlab import allocator; allocator.use_tcmalloc(); allocator.use_tcmalloc(); "
         "print(allocator.loaded(), os.environ.get('LD_PRELOAD'), os.environ.get(allocator.PRELOADED), sys.argv[1:])")


def run_probe(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.PRELOADED, allocator.CHOICE)}
    out = subprocess.run([sys.executable, "-c", PROBE, "a b", "--x"], capture_output=True, text=True, timeout=60,
                         env={**base, "PYTHONPATH": str(SRC), **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(None, 3)


def test_a_process_restarts_with_tcmalloc_its_arguments_intact_and_does_not_pass_the_preload_on():
    library = allocator.find_tcmalloc()
    if library is None:
        if os.environ.get("CI"):  # .ci/run installs it: in CI a missing library is a failure, never a skip
            pytest.fail("CI has no tcmalloc: .ci/run should have installed libtcmalloc-minimal4")
        pytest.skip("no tcmalloc here: `apt-get install libtcmalloc-minimal4` enables this test")
    mapped, preload, marker, argv = run_probe()
    assert Path(mapped).resolve() == Path(library).resolve()
    assert preload == "None" and marker == "None"  # children start with the environment the command had
    assert argv == "['a b', '--x']"
    mapped, *_ = run_probe(TRAINLAB_MALLOC="system")
    assert mapped == "None"
