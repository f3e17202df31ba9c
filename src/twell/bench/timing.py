"""Timing of device work, not of Python.

A timed workload is a list of callables, one per weight set (the runner passes 4 "layers" of
weights so that no call finds its weights in L2 from the previous call), called round-robin.

CUDA methods:
- ``queued`` (the default): a GPU sleep kernel (``torch.cuda._sleep``) is enqueued first and
  the timed calls (in batches of 32) are issued behind it, so the host has issued them before the GPU reaches
  them; CUDA events around each call then measure device time with no host gaps. At small M a
  dense FFN forward is ~0.045 ms of device work but 0.08-0.15 ms of host launch cost on the H100,
  which eager timing would report instead.
- ``eager``: the same events, calls issued back-to-back from Python with no sleep: what a Python
  loop sees (host-bound at small M).
- ``graph``: each callable captured in a CUDA graph, replays timed as in ``queued``.
CPU: ``wall``, ``time.perf_counter`` around each call.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Timing", "time_calls", "time_graphs", "synced_ms", "peak_memory_mib", "percentile", "on_device"]

_SLEEP_CYCLES_PER_MS: dict[int, float] = {}
#: timed calls queued behind one GPU sleep (see _queued)
_QUEUE_BATCH = 32


@dataclass
class Timing:
    """Per-call times of one workload, in ms.

    Attributes:
        ms: median; p20, p80: 20th / 80th percentiles; reps: calls timed.
        method: ``queued``, ``eager``, ``graph`` or ``wall``.
        host_ms: host time to issue one call (CUDA; measured while the GPU was asleep).
        queued_ok: False when the host took longer to issue the calls than the GPU sleep lasted,
            so some calls were not queued (e.g. a call that synchronises): the times then
            include host gaps.
        times: every per-call time.
    """

    ms: float
    p20: float
    p80: float
    reps: int
    method: str
    host_ms: float | None = None
    queued_ok: bool | None = None
    times: list[float] = field(default_factory=list, repr=False)


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile of ``xs`` (q in [0, 100])."""
    if not xs:
        raise ValueError("xs: needs at least one value")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _summary(times: list[float], method: str, **kw) -> Timing:
    return Timing(
        ms=statistics.median(times),
        p20=percentile(times, 20),
        p80=percentile(times, 80),
        reps=len(times),
        method=method,
        times=times,
        **kw,
    )


def _cycles_per_ms(device: torch.device) -> float:
    """GPU clock cycles per ms of ``torch.cuda._sleep`` (calibrated once per device)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SLEEP_CYCLES_PER_MS:
        torch.cuda._sleep(1_000_000)
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        torch.cuda._sleep(20_000_000)
        e.record()
        e.synchronize()
        _SLEEP_CYCLES_PER_MS[idx] = 20_000_000 / max(s.elapsed_time(e), 1e-3)
    return _SLEEP_CYCLES_PER_MS[idx]


def on_device(device: torch.device):
    """Makes ``device`` current while timing (events and the sleep run on its current stream)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warmup(fns: Sequence[Callable], device: torch.device, warmup_ms: float) -> float:
    """Calls each of ``fns`` once (compilation, autotuning, allocator growth happen here), then
    round-robin for at least ``warmup_ms`` more and at least one more round; returns the median
    synchronised wall time of those later calls in ms (an upper bound on one call's cost, used
    to size the number of timed reps)."""
    for f in fns:
        f()
    _sync(device)
    times = []
    t0 = time.perf_counter()
    n = 0
    while n < len(fns) or (time.perf_counter() - t0) * 1e3 < warmup_ms:
        t1 = time.perf_counter()
        fns[n % len(fns)]()
        _sync(device)
        times.append((time.perf_counter() - t1) * 1e3)
        n += 1
    return statistics.median(times)


def _reps_for(est_ms: float, target_ms: float, min_reps: int, max_reps: int, period: int) -> int:
    reps = int(target_ms / max(est_ms, 1e-4))
    reps = max(min_reps, min(max_reps, reps))
    return -(-reps // period) * period


def _events(n: int):
    return [torch.cuda.Event(enable_timing=True) for _ in range(n)]


def _queued(fns: Sequence[Callable], device: torch.device, reps: int) -> Timing:
    L = len(fns)
    cpm = _cycles_per_ms(device)
    # host issue cost per call, measured while the GPU sleeps so no launch blocks on it
    _sync(device)
    torch.cuda._sleep(int(20 * cpm))
    t0 = time.perf_counter()
    for i in range(L):
        fns[i]()
    host_ms = (time.perf_counter() - t0) * 1e3 / L
    _sync(device)
    # Calls are queued in batches of at most _QUEUE_BATCH, each behind its own sleep: a deep
    # queue of launches (100 reps of a ~20-kernel backward) could fill the driver's launch queue
    # and block the host, which would look like a host gap. Each sleep must outlast issuing its
    # batch: at least 20 ms, at most 2 s.
    times: list[float] = []
    ok = True
    for b0 in range(0, reps, _QUEUE_BATCH):
        n = min(_QUEUE_BATCH, reps - b0)
        sleep_ms = min(2000.0, max(20.0, 1.5 * host_ms * n + 5.0))
        starts, ends = _events(n), _events(n)
        torch.cuda._sleep(int(sleep_ms * cpm))
        t0 = time.perf_counter()
        for i in range(n):
            starts[i].record()
            fns[(b0 + i) % L]()
            ends[i].record()
        ok = ok and (time.perf_counter() - t0) * 1e3 < sleep_ms
        _sync(device)
        times += [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return _summary(times, "queued", host_ms=host_ms, queued_ok=ok)


def _eager(fns: Sequence[Callable], device: torch.device, reps: int) -> Timing:
    L = len(fns)
    _sync(device)
    starts, ends = _events(reps), _events(reps)
    for i in range(reps):
        starts[i].record()
        fns[i % L]()
        ends[i].record()
    _sync(device)
    return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)], "eager")


def synced_ms(fn: Callable, device: torch.device | str, reps: int) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn``, each waited for before the next is issued
    (CUDA events on a GPU, wall clock elsewhere): for work long enough that host gaps do not matter
    (roofline probes, whole-model forwards)."""
    times = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(reps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _wall(fns: Sequence[Callable], reps: int) -> Timing:
    L = len(fns)
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fns[i % L]()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times, "wall")


def time_calls(
    fns: Sequence[Callable],
    device: torch.device | str,
    *,
    methods: Sequence[str] = ("queued", "eager"),
    warmup_ms: float = 100.0,
    target_ms: float = 300.0,
    min_reps: int = 10,
    max_reps: int = 100,
) -> dict[str, Timing]:
    """Times ``fns`` (called round-robin) with each of ``methods``; returns ``{method: Timing}``.

    On CPU every method is replaced by one ``wall`` timing (key ``"wall"``). The number of reps
    is sized so one method takes about ``target_ms``, within ``[min_reps, max_reps]``, rounded up
    to a multiple of ``len(fns)`` so each weight set is called equally often.
    """
    if not fns:
        raise ValueError("fns: needs at least one callable")
    device = torch.device(device)
    bad = [m for m in methods if m not in ("queued", "eager")]
    if bad:
        raise ValueError(f"methods: {bad} not in ('queued', 'eager') (graphs: use time_graphs)")
    with on_device(device):
        est = _warmup(fns, device, warmup_ms)
        reps = _reps_for(est, target_ms, min_reps, max_reps, len(fns))
        if device.type != "cuda":
            return {"wall": _wall(fns, reps)}
        out = {}
        for m in methods:
            out[m] = _queued(fns, device, reps) if m == "queued" else _eager(fns, device, reps)
        return out


def time_graphs(
    fns: Sequence[Callable],
    device: torch.device | str,
    *,
    warmup_ms: float = 50.0,
    target_ms: float = 300.0,
    min_reps: int = 10,
    max_reps: int = 100,
) -> tuple[Timing | None, str | None]:
    """Captures each of ``fns`` in a CUDA graph and times the replays queued behind a GPU sleep.

    Returns ``(timing, None)``, or ``(None, reason)`` when the device is not CUDA or capture fails
    (e.g. a callable that synchronises with the host).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None, "CUDA graphs need a CUDA device"
    with on_device(device):
        return _time_graphs(fns, device, warmup_ms, target_ms, min_reps, max_reps)


def _time_graphs(fns, device, warmup_ms, target_ms, min_reps, max_reps):
    graphs = []
    keep = []
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for f in fns:
                for _ in range(2):
                    f()
        torch.cuda.current_stream(device).wait_stream(side)
        for f in fns:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                keep.append(f())  # outputs stay alive: the graph's memory pool owns them
            graphs.append(g)
    except Exception as e:  # any capture failure is reported in the row, not raised
        _sync(device)
        return None, f"capture failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    replays = [g.replay for g in graphs]
    est = _warmup(replays, device, warmup_ms)
    reps = _reps_for(est, target_ms, min_reps, max_reps, len(replays))
    t = _queued(replays, device, reps)
    t.method = "graph"
    del keep
    return t, None


def peak_memory_mib(fn: Callable, device: torch.device | str) -> float | None:
    """Peak memory allocated during one call of ``fn`` above what was allocated before it, in
    MiB (its outputs included); None on CPU, where torch keeps no such counter."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / (1 << 20)
