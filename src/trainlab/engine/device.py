"""Device choice: ``auto`` takes the best accelerator present."""

from __future__ import annotations

import os

import torch

from trainlab.config import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ConfigError("device", f"must be one of {'|'.join(DEVICES)}, got {name!r}")
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if has_mps else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for but no CUDA device is available")
    if name == "mps" and not has_mps:
        raise ConfigError("device", "mps was asked for but no MPS device is available")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("device", f"not a device name: {name[:40]!r}") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError("device", f"{name} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock timings mean something on accelerators."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def set_fp32_matmul(device: torch.device, tf32: bool) -> str | None:
    """On CUDA, fp32 matmuls in TF32 (``tf32``: a 10-bit mantissa on tensor cores, Ampere and
    later; several times the fp32 rate) or in full fp32; what they run in, for the run's
    record. Elsewhere nothing is set and None is returned (CPUs have no TF32, and the
    setting would reach their matmuls too)."""
    if device.type != "cuda":
        return None
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    return "tf32" if tf32 else "fp32"


DETERMINISTIC_ENV = "TRAINLAB_DETERMINISTIC"


def deterministic_from_env() -> bool:
    """``TRAINLAB_DETERMINISTIC=1``: every kernel deterministic (``torch.use_deterministic_algorithms``;
    CUDA's cuBLAS also needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8``). For checks that compare runs
    bit for bit on a GPU, where some kernels (atomics in backward passes) are not; CPUs need
    nothing. Off unless set."""
    on = os.environ.get(DETERMINISTIC_ENV, "") not in ("", "0")
    if on:
        torch.use_deterministic_algorithms(True)
    return on


def cuda_rng_states() -> list[torch.Tensor] | None:
    """The RNG state of every CUDA device present (None without CUDA)."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def set_cuda_rng_states(states: list[torch.Tensor] | None) -> None:
    """Restore saved CUDA RNG states to the devices present: a run saved with more devices
    visible than there are now (a resume with fewer GPUs, or another process count) gives
    each present device its own saved state and leaves the rest unused; with fewer saved
    than present, the extra devices keep their fresh seeding."""
    if not states or not torch.cuda.is_available():
        return
    for index, state in enumerate(states[:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, index)


def rng_point(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU RNG and, on a CUDA device, that device's: what dropout draws from."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def rewind_rng(point: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    """Back to ``rng_point(device)``: a retried or timed pass draws the same dropout masks
    as the pass it repeats, on a GPU as on a CPU."""
    cpu, accelerator = point
    torch.set_rng_state(cpu)
    if accelerator is not None:
        torch.cuda.set_rng_state(accelerator, device)
