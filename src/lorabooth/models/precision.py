"""What makes a step fast without changing what it computes.

Measured on SD 1.5's architecture on a 2-core CPU (benchmarks/RESULTS.md):
the allocator setting below takes the fp32 step from 3.35 s to 2.83 s, and
keeping the frozen weights in bf16 (``--mixed-precision bf16``) from an
autocast step of 2.05 s to 1.69 s. channels_last measured no gain and is not
used.
"""

from __future__ import annotations

import ctypes
import logging
import platform

import torch

from ..formats.lycoris import is_adapter_parameter

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit
_KEEP = 1 << 30


def tune_allocator() -> bool:
    """Keep freed activation buffers in the process instead of handing them
    back to the kernel after every op.

    glibc maps every large block (an activation, a gradient) freshly with
    mmap and unmaps it on free, so each training step page-faults gigabytes
    of zeroed memory back in (about 7.7 M minor faults over 7 SD 1.5 steps).
    Serving blocks up to 32 MB from the heap and not trimming it cuts that to
    1.4 M and the step time by about 15%. Numbers are unchanged: only where
    memory comes from. A no-op off glibc (macOS, Windows, musl). Returns
    whether the setting took."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, _KEEP),
            (_M_TOP_PAD, _KEEP)))
    except (OSError, AttributeError):
        return False
    log.debug("allocator tuned: %s", ok)
    return ok


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen weights are kept in: the compute dtype under mixed
    precision (no per-step casting of 860 M weights), fp32 otherwise."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point weights and buffers of ``module`` that do not
    train (everything but LoRA) to ``dtype``; LoRA weights are kept fp32 so
    AdamW's updates are not lost to bf16 rounding."""
    for name, p in module.named_parameters():
        want = torch.float32 if is_adapter_parameter(name) else dtype
        if p.is_floating_point() and p.dtype != want:
            p.data = p.data.to(want)
    for b in module.buffers():
        if b.is_floating_point() and b.dtype != dtype:
            b.data = b.data.to(dtype)


def frozen_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of ``module``'s frozen (non-LoRA) floating-point weights."""
    for name, p in module.named_parameters():
        if not is_adapter_parameter(name) and p.is_floating_point():
            return p.dtype
    return torch.float32
