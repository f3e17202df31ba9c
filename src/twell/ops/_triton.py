"""Helpers for deciding whether a Triton kernel can run on a tensor."""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["triton_available", "interpreter_enabled", "can_run_triton", "num_sms", "pdl_ok", "tma_aligned"]


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1: kernels then run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def can_run_triton(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``t``'s device (a CUDA GPU, or any device in the interpreter)."""
    if not triton_available():
        return False
    return t.is_cuda or interpreter_enabled()


def tma_aligned(t: torch.Tensor) -> bool:
    """Whether the rows of the 2-D ``t`` can be TMA blocks: unit stride along them, row starts and
    base 16-byte aligned."""
    return t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


@functools.cache
def num_sms(dev: torch.device) -> int:
    """Streaming multiprocessors of ``dev`` (4 off CUDA: the interpreter runs programs in turn)."""
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4


@functools.cache
def pdl_ok(dev: torch.device) -> bool:
    """Programmatic dependent launch is usable: a CUDA device of sm_90+ (not the interpreter) and a
    Triton with grid dependency control."""
    if dev.type != "cuda" or interpreter_enabled():
        return False
    import triton.language as tl

    cuda_ext = getattr(getattr(tl, "extra", None), "cuda", None)
    return torch.cuda.get_device_capability(dev)[0] >= 9 and hasattr(cuda_ext, "gdc_wait")
