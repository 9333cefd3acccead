"""Device choice: ``auto`` takes the best accelerator present."""

from __future__ import annotations

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
