"""The environment every benchmark row carries: device, CUDA, torch, triton, git commit, time."""

from __future__ import annotations

import datetime as _dt
import os
import re
import subprocess
from pathlib import Path

import torch

from .roofline import device_name

__all__ = ["env_info", "git_commit", "slug", "resolve_device", "resolve_dtype", "DTYPES"]

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def git_commit() -> str:
    """Short commit of the checkout twell runs from (``-dirty`` when tracked files changed);
    ``$TWELL_COMMIT`` overrides it (for copies of the tree without ``.git``); ``"unknown"``
    when neither is available."""
    if os.environ.get("TWELL_COMMIT"):
        return os.environ["TWELL_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device; None picks cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {device!r} is not a torch device ({e})") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    if d.type not in ("cuda", "cpu"):
        raise ValueError(f"device: {device!r} not supported (cuda or cpu)")
    return d


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype`` as a torch.dtype; None is bfloat16 on CUDA and float32 on CPU (where bf16
    matmuls are emulated and would time the emulation)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype: {dtype} not supported (bfloat16, float16, float32)")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} not supported (one of {sorted(DTYPES)})")
    return DTYPES[dtype]


def env_info(device: torch.device) -> dict[str, str]:
    """``{"gpu", "cuda", "torch", "triton", "commit", "timestamp", "device"}`` for this run; on
    CPU ``gpu`` names the CPU, so CPU numbers are never mistaken for GPU ones."""
    return {
        "gpu": device_name(device),
        "cuda": torch.version.cuda or "none",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
    }


def slug(text: str) -> str:
    """``text`` reduced to ``[a-z0-9-]`` for file names."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"
