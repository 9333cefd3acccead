"""Mixed precision: which dtype the forward pass runs in, loss scaling, and the way back to fp32.

``auto`` picks by what the device does fast:

    CUDA with bf16 support (Ampere and newer)   bf16, no loss scaling needed
    older CUDA                                  fp16 with a GradScaler
    CPU with native bf16 (AMX, AVX-512-BF16)    measured: fp32 and bf16 are timed on the first
                                                batch and bf16 kept only when it is faster by
                                                ``BF16_MARGIN`` (see ``pick_precision``)
    any other CPU, MPS                          fp32 (bf16 matmuls without native support run
                                                ~100x slower)

Why measure on CPUs: native bf16 is not always faster. AMX made a 10.65M GPT 2.35x faster
and a 0.8M one 24% slower (conversions cost more than small matmuls save); AVX-512-BF16
without AMX (an AMD EPYC here) ran large bf16 matmuls 2.7x faster than fp32. The timing
happens once per run in the loop (``engine/loop.py``) and is saved with the member, so
a resume does not time again.

``TRAINLAB_AUTO_PRECISION`` is a test hook, off unless set: ``fp32``, ``bf16`` or
``fp16`` makes ``auto`` resolve to that on any device without timing (so a machine
without AMX can run the suite as an AMX machine would); ``measure`` makes ``auto`` time
fp32 against bf16 on a CPU even without native bf16. An explicit ``--precision`` is never
affected.

The forward pass (and evaluation) runs under ``torch.autocast``; the weights, gradients
and optimizer state stay fp32. A step whose loss or gradient norm is not finite is
skipped by the loop; after ``max_nonfinite`` such steps in a row the member drops to
fp32 for the rest of the run (``fall_back``), which is saved with it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from trainlab import allocator
from trainlab.config import ConfigError
from trainlab.engine.train_config import PRECISIONS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AUTO_ENV = "TRAINLAB_AUTO_PRECISION"
BF16_MARGIN = 0.05  # bf16 must be this much faster than fp32 to be kept: less is within noise


def _cpu_flag(name: str) -> bool:
    check = getattr(torch.cpu, name, None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX-512-BF16 instructions: bf16 matmuls run in hardware (whether they
    are faster for a given model is measured, not assumed)."""
    return _cpu_flag("_is_amx_tile_supported") or _cpu_flag("_is_avx512_bf16_supported")


def cpu_summary() -> str:
    """The CPU model and the flags that decide precision speed, for figures to name their machine."""
    malloc = ", tcmalloc" if allocator.loaded() else ""  # allocator.py: figures name their malloc
    model, flags = _cpu_model_and_flags()
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{malloc}; flags: {flags}"


def cpu_identity() -> str:
    """The CPU model and its flags alone (not threads, cores or malloc): what code built for
    this CPU's instructions is keyed by."""
    model, flags = _cpu_model_and_flags()
    return f"{model}; flags: {flags}"


def machine_class(device: torch.device) -> str:
    """The class a figure in minutes belongs to (minutes buy different step counts on each):
    a GPU's name, or the CPU's class by what it does natively: AMX, AVX-512-BF16, AVX-512 or
    AVX2 (bf16 emulated on the last two), else the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for flag, name in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX-512-BF16"),
                       ("_is_avx512_supported", "AVX-512"), ("_is_avx2_supported", "AVX2")):
        if _cpu_flag(flag):
            return name
    return _cpu_model_and_flags()[0] or "CPU"


def _cpu_model_and_flags() -> tuple[str, str]:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import platform

    model = model or platform.processor() or platform.machine()
    flags = {"avx2": _cpu_flag("_is_avx2_supported"), "avx512f": _cpu_flag("_is_avx512_supported"),
             "avx512_bf16": _cpu_flag("_is_avx512_bf16_supported"), "amx_bf16": _cpu_flag("_is_amx_tile_supported")}
    shown = " ".join(name for name, present in flags.items() if present) or "none of avx2/avx512f/avx512_bf16/amx_bf16"
    return model, shown


def _forced() -> str | None:
    value = os.environ.get(AUTO_ENV, "").strip()
    if not value:
        return None
    if value not in ("fp32", "bf16", "fp16", "measure"):
        raise ConfigError("precision", f"{AUTO_ENV} must be fp32, bf16, fp16 or measure, got {value!r}")
    return value


def precision_candidates(name: str, device: torch.device) -> tuple[str, ...]:
    """The modes ``name`` may run in on ``device``: one, or for ``auto`` on a CPU with
    native bf16, ``("fp32", "bf16")`` to be timed (fp32 first: what runs until then)."""
    if name not in PRECISIONS:
        raise ConfigError("precision", f"must be one of {'|'.join(PRECISIONS)}, got {name!r}")
    if name != "auto":
        if name != "fp32" and device.type == "mps":
            raise ConfigError("precision", f"{name} is not supported on mps here; use fp32 or auto")
        return (name,)
    forced = _forced()
    if forced == "measure" and device.type == "cpu":
        return ("fp32", "bf16")
    if forced in DTYPES or forced == "fp32":
        return (forced,)
    if device.type == "cuda":
        return ("bf16",) if torch.cuda.is_bf16_supported() else ("fp16",)
    if device.type == "cpu" and cpu_has_native_bf16():
        return ("fp32", "bf16")
    return ("fp32",)


def resolve_precision(name: str, device: torch.device) -> str:
    """``name`` made concrete for ``device`` as far as it can be without timing: an explicit
    choice as given, ``auto`` as the device rule says, or fp32 where it is still to be measured."""
    return precision_candidates(name, device)[0]


def slow_precision_warning(name: str, device: torch.device) -> str | None:
    """One line when an explicit bf16 or fp16 will run without hardware support on a CPU."""
    if device.type != "cpu" or name not in DTYPES:
        return None
    native = cpu_has_native_bf16() if name == "bf16" else _cpu_flag("_is_amx_fp16_supported")
    if native:
        return None
    return (f"warning: --precision {name}: this CPU has no native {name} ({cpu_summary().split('; ')[-1]}), "
            f"so it runs slowly (often 10-100x); --precision fp32 or auto is faster here")


def pick_precision(timings: dict[str, float], margin: float = BF16_MARGIN) -> str:
    """fp32, unless another mode's time (seconds per pass) beats it by more than ``margin``."""
    best = min(timings, key=timings.get)
    if best != "fp32" and "fp32" in timings and timings[best] > (1 - margin) * timings["fp32"]:
        return "fp32"
    return best


class Precision:
    """One member's precision: its autocast context, (fp16 only) its loss scaler, and for
    ``auto`` on a CPU the modes still to be timed and what the timing found."""

    def __init__(self, requested: str, device: torch.device) -> None:
        self.device = device
        self.requested = requested
        self.candidates = precision_candidates(requested, device)
        self.measured: dict[str, float] = {}  # seconds per timed pass, by mode, once auto has timed them
        self.fell_back_at: int | None = None  # the step of the fall-back to fp32, if any
        self._set(self.candidates[0])

    def _set(self, mode: str) -> None:
        self.mode = mode
        self.dtype = DTYPES.get(mode)
        # scaling matters only for fp16, whose small exponent range underflows gradients
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=mode == "fp16")

    @property
    def undecided(self) -> bool:
        """``auto`` has more than one candidate here and has not timed them yet."""
        return len(self.candidates) > 1 and not self.measured and self.fell_back_at is None

    def use(self, mode: str) -> None:
        """Run in ``mode`` (one of the candidates) from now on; used while timing them."""
        if mode != self.mode:
            self._set(mode)

    def decide(self, timings: dict[str, float]) -> str:
        """Keep the mode the timings favour (``pick_precision``) and remember them."""
        self.measured = dict(timings)
        self.use(pick_precision(timings))
        return self.mode

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def fall_back(self, step: int) -> None:
        """fp32 from now on, for good (a resume keeps it)."""
        self.fell_back_at = step
        self._set("fp32")

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "fell_back_at": self.fell_back_at, "scaler": self.scaler.state_dict(),
                "requested": self.requested, "measured": dict(self.measured)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A fall-back is kept; so is what ``auto`` measured, when ``auto`` is still asked for and
        the same modes are candidates here (else the device changed, and it is timed again);
        otherwise the mode asked for now stands. The loss scale carries over when both sides use one."""
        measured = {str(k): float(v) for k, v in (state.get("measured") or {}).items()}
        if state.get("fell_back_at") is not None:
            self.fell_back_at = int(state["fell_back_at"])
            self._set("fp32")
        elif (self.requested == "auto" and state.get("requested") == "auto" and len(self.candidates) > 1
              and set(measured) == set(self.candidates) and state.get("mode") in self.candidates):
            self.measured = measured
            self.use(str(state["mode"]))
        scaler = state.get("scaler") or {}
        if self.scaler.is_enabled() and scaler:
            self.scaler.load_state_dict(scaler)
