"""Mixed precision: which dtype the forward pass runs in, loss scaling, and the way back to fp32.

``auto`` picks by what the device does fast:

    CUDA with bf16 support (Ampere and newer)   bf16, no loss scaling needed
    older CUDA                                  fp16 with a GradScaler
    CPU with AMX tiles                          bf16
    any other CPU, MPS                          fp32 (bf16 matmuls without AMX run ~100x slower)

The forward pass (and evaluation) runs under ``torch.autocast``; the weights, gradients
and optimizer state stay fp32. A step whose loss or gradient norm is not finite is
skipped by the loop; after ``max_nonfinite`` such steps in a row the member drops to
fp32 for the rest of the run (``fall_back``), which is saved with it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from trainlab.config import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """AMX tiles are what make bf16 matmuls fast on a CPU; AVX-512-BF16 alone is not enough."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` made concrete for ``device``; an explicit choice is kept as given."""
    if name not in PRECISIONS:
        raise ConfigError("precision", f"must be one of {'|'.join(PRECISIONS)}, got {name!r}")
    if name != "auto":
        if name != "fp32" and device.type == "mps":
            raise ConfigError("precision", f"{name} is not supported on mps here; use fp32 or auto")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


class Precision:
    """One member's precision: its autocast context and (fp16 only) its loss scaler."""

    def __init__(self, mode: str, device: torch.device) -> None:
        self.device = device
        self.fell_back_at: int | None = None  # the step of the fall-back to fp32, if any
        self._set(mode)

    def _set(self, mode: str) -> None:
        self.mode = mode
        self.dtype = DTYPES.get(mode)
        # scaling matters only for fp16, whose small exponent range underflows gradients
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=mode == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def fall_back(self, step: int) -> None:
        """fp32 from now on, for good (a resume keeps it)."""
        self.fell_back_at = step
        self._set("fp32")

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "fell_back_at": self.fell_back_at, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A fall-back is kept; otherwise the mode asked for now (the device may have changed)
        stands, and the loss scale carries over when both sides use one."""
        if state.get("fell_back_at") is not None:
            self.fell_back_at = int(state["fell_back_at"])
            self._set("fp32")
        scaler = state.get("scaler") or {}
        if self.scaler.is_enabled() and scaler:
            self.scaler.load_state_dict(scaler)
