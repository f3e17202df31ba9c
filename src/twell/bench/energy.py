"""GPU energy from NVML's total-energy counter (mJ since the driver loaded).

The counter integrates power on the device, so a reading before and after a stretch of
back-to-back calls gives their energy without sampling gaps (a 50 ms power sampler misses
most of a 10 ms call). The counter advances in steps, so a measurement needs about a second of
work; :func:`measure_energy` sizes the number of calls from a known per-call time.

Uses ``nvidia-ml-py`` (``pip install nvidia-ml-py`` or ``pip install twell[energy]``); when it is
missing, the NVML library the driver installs (``libnvidia-ml.so.1``) is called directly through
ctypes for the two functions needed, so energy is still measured on a bare machine.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["EnergyMeter", "open_meter", "measure_energy", "INSTALL_HINT"]

INSTALL_HINT = (
    "energy needs NVML: pip install nvidia-ml-py (or twell[energy]) on a machine with an NVIDIA driver"
)


class EnergyMeter:
    """Reads the total energy (mJ) of one GPU. Build it with :func:`open_meter`."""

    def __init__(self, read: Callable[[], int], source: str):
        self._read = read
        self.source = source

    def read_mj(self) -> int:
        return int(self._read())


def _torch_uuid(device: torch.device) -> str | None:
    try:
        u = torch.cuda.get_device_properties(device).uuid
    except (AttributeError, RuntimeError):
        return None
    return f"GPU-{u}"


def _pynvml_meter(device: torch.device) -> EnergyMeter:
    import pynvml

    pynvml.nvmlInit()
    handle = None
    uuid = _torch_uuid(device)
    if uuid is not None:
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        except pynvml.NVMLError:
            handle = None
    if handle is None:
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises NVMLError when unsupported
    return EnergyMeter(lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle), "pynvml")


def _ctypes_meter(device: torch.device) -> EnergyMeter:
    lib = ctypes.CDLL("libnvidia-ml.so.1")
    if lib.nvmlInit_v2() != 0:
        raise OSError("nvmlInit_v2 failed")
    handle = ctypes.c_void_p()
    rc = 1
    uuid = _torch_uuid(device)
    if uuid is not None:
        rc = lib.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(handle))
    if rc != 0:
        rc = lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(device.index or 0), ctypes.byref(handle))
    if rc != 0:
        raise OSError(f"nvmlDeviceGetHandle failed ({rc})")

    def read() -> int:
        mj = ctypes.c_ulonglong()
        r = lib.nvmlDeviceGetTotalEnergyConsumption(handle, ctypes.byref(mj))
        if r != 0:
            raise OSError(f"nvmlDeviceGetTotalEnergyConsumption failed ({r})")
        return mj.value

    read()
    return EnergyMeter(read, "libnvidia-ml (ctypes)")


def open_meter(device: torch.device | str) -> tuple[EnergyMeter | None, str | None]:
    """An :class:`EnergyMeter` for ``device``, or ``(None, reason)`` when energy cannot be read
    (CPU, no NVML, or a GPU without the counter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, "energy is measured on NVIDIA GPUs only"
    errors = []
    try:
        return _pynvml_meter(device), None
    except ImportError:
        errors.append("nvidia-ml-py not installed")
    except Exception as e:  # NVMLError and friends: fall through to the driver library
        errors.append(f"pynvml: {e}")
    try:
        return _ctypes_meter(device), None
    except (OSError, AttributeError) as e:
        errors.append(f"libnvidia-ml: {e}")
    return None, f"{'; '.join(errors)} ({INSTALL_HINT})"


def measure_energy(
    meter: EnergyMeter,
    fns: Sequence[Callable],
    device: torch.device | str,
    *,
    call_ms: float,
    seconds: float = 1.0,
) -> dict[str, float]:
    """Runs ``fns`` round-robin back-to-back for about ``seconds`` and returns
    ``{"mj_per_call", "avg_power_w", "calls", "seconds"}`` from the energy counter (idle power
    not subtracted: the number is what the GPU drew)."""
    device = torch.device(device)
    calls = max(len(fns), int(seconds * 1e3 / max(call_ms, 1e-3)))
    calls = -(-calls // len(fns)) * len(fns)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda _d: None
    sync(device)
    e0 = meter.read_mj()
    t0 = time.perf_counter()
    for i in range(calls):
        fns[i % len(fns)]()
    sync(device)
    dt = time.perf_counter() - t0
    e1 = meter.read_mj()
    mj = float(e1 - e0)
    return {"mj_per_call": mj / calls, "avg_power_w": mj / 1e3 / dt, "calls": calls, "seconds": dt}
