"""tcmalloc for the process where the machine has it: CPU training steps up to 1.14x faster.

A training step allocates a few dozen tensors of 1-11 MB and frees them again. glibc's malloc
hands such blocks back to the kernel when they are freed, so the next step's tensors fault
their pages in again, zeroed: on a 2-core EPYC, ``x * y`` of a (32, 128, 688) fp32 output
took 1-4 ms that way against 0.45 ms with tcmalloc, which keeps freed memory for reuse
(550-640 page faults a product against none; glibc stops faulting in some processes, once it
has raised its mmap threshold). A whole ``chat-20min`` fp32 step was 0.96-1.14x faster, 1.07x
over 12 alternated runs of each (``benchmarks/allocator.py``, results/allocator/): modest
beside this machine's noise, and it costs one interpreter start-up. PyTorch's CPU
performance guide recommends the same. Which malloc a process uses is decided when it starts, so the
``trainlab`` command (and ``main.py``) starts itself once more with gperftools' tcmalloc
preloaded when the machine has it (Debian and Ubuntu: ``apt install libtcmalloc-minimal4``)
and nothing else is preloaded. That costs one interpreter start-up (tens of milliseconds),
before PyTorch is imported.

``TRAINLAB_MALLOC=system`` keeps the system's malloc. The preload is not passed on: what the
process starts (a browser, a compiler, torchrun's workers, which choose for themselves) sees
the environment it was started with.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

CHOICE = "TRAINLAB_MALLOC"  # "system": keep the system's malloc
PRELOADED = "TRAINLAB_PRELOADED"  # set in the restarted process
NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
FOLDERS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_tcmalloc(folders: tuple[str, ...] = FOLDERS) -> str | None:
    """The path of an installed tcmalloc, or None."""
    for folder in folders:
        for name in NAMES:
            path = os.path.join(folder, name)
            if os.path.exists(path):
                return path
    return None


def restart_env(env: Mapping[str, str], library: str | None, platform: str = sys.platform) -> dict[str, str] | None:
    """The environment to start this command again in, with ``library`` preloaded, or None to
    go on as it is: not on Linux, no library, ``TRAINLAB_MALLOC=system``, something already
    preloaded (a profiler's, a user's), or this process is the restarted one."""
    if (platform != "linux" or library is None or env.get(CHOICE, "auto") == "system"
            or PRELOADED in env or env.get("LD_PRELOAD")):
        return None
    return {**env, "LD_PRELOAD": library, PRELOADED: "1"}


def use_tcmalloc() -> None:
    """Start this process again with tcmalloc (``os.execv`` keeps its PID, so a supervisor's
    signals and a parent's wait still reach it), or return. In the restarted process, drop
    ``LD_PRELOAD`` again (it was unset before), so what it starts does not inherit the preload."""
    if os.environ.pop(PRELOADED, None) is not None:
        os.environ.pop("LD_PRELOAD", None)
        return
    if loaded() is not None:  # a second call in a restarted process (its marker is gone): never again
        return
    env = restart_env(os.environ, find_tcmalloc())
    if env is None:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        return  # could not restart: go on with the system's malloc


def loaded() -> str | None:
    """The tcmalloc this process has mapped, or None (Linux; for the run's record and tests)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            for line in f:
                if "libtcmalloc" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return None
