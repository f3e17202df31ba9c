"""Development benchmark of the training kernels (``twell.ops.ffn_train``) against dense autograd.

Legend: M = tokens, K = model dim, N = FFN units, a = active units per token.

For each case: dense autograd (three cuBLAS GEMMs, relu, multiply, the same L1 term) and the
twell op, bf16, in the same process on the same data; forward and forward+backward device time
(CUDA events, median of reps after warm-up), peak extra memory of one step, and errors against
an fp32 autograd reference (max|err| / max|ref|) for y and the four gradients, next to dense
bf16's own error. Writes DESIGN section 7 rows (one JSON object per line) to ``--out``.

Usage: ``PYTHONPATH=src python benchmarks/dev_train.py --out benchmarks/results/train-h100.jsonl``
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import subprocess

import torch
import torch.nn.functional as F

from twell.ops import ffn_train as ft
from twell.ops.ffn_ref import sparse_ffn_ref
from twell.testing import make_sparse_ffn, rel_error

L1_COEFF = 2e-5


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001 - a benchmark run outside git still reports its numbers
        return "unknown"


def _time(fn, reps: int, warm: int = 3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return statistics.median(ts), ts[len(ts) // 5], ts[(4 * len(ts)) // 5]


def _step(f, x, ws, dy):
    y, st = f(x, *ws)
    torch.autograd.backward([y, st.l1], [dy, torch.full_like(st.l1, L1_COEFF)])


def _dense(x, wg, wu, wd):
    """Dense autograd with the L1 term, nothing else (the baseline of reference-h100 B.4)."""
    h = torch.relu(F.linear(x, wg)) * F.linear(x, wu)
    l1 = torch.linalg.vector_norm(h, 1, dtype=torch.float32) / x.shape[0]
    return F.linear(h, wd), _L1(l1)


class _L1:
    def __init__(self, l1):
        self.l1 = l1
        self.l0 = torch.zeros(())


def _twell(x, wg, wu, wd):
    return ft.ffn_train(x, wg, wu, wd, dispatch=False)


def _twell_dispatch(x, wg, wu, wd):
    return ft.ffn_train(x, wg, wu, wd)


def _peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _grads(f, x, ws, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, *ws)]
    y, st = f(*leaves)
    torch.autograd.backward([y, st.l1], [dy.to(y.dtype), torch.full_like(st.l1, L1_COEFF)])
    return [y.detach()] + [t.grad for t in leaves], st


def run_case(K, N, M, a, pattern, reps, rows, providers=("dense", "twell")):
    dev = "cuda"
    x, wg, wu, wd = make_sparse_ffn(M, K, N, a, pattern=pattern, dtype=torch.bfloat16, device=dev, seed=1)
    wg = torch.nan_to_num(wg, neginf=-100.0)  # never-active units get -inf thresholds from make_sparse_ffn
    ws = [t.requires_grad_() for t in (wg, wu, wd)]
    x.requires_grad_()
    dy = torch.randn(M, K, device=dev, dtype=torch.bfloat16) * 1e-2
    # correctness against fp32 autograd on the same bf16 inputs
    ref, st_ref = _grads(sparse_ffn_ref, x.float(), [w.float() for w in ws], dy.float())
    den, _ = _grads(_dense, x, ws, dy)
    tw, st_tw = _grads(_twell, x, ws, dy)
    names = ["y", "dx", "dw_gate", "dw_up", "dw_down"]
    errs = {n: (rel_error(t, r), rel_error(d, r)) for n, t, d, r in zip(names, tw, den, ref)}
    a_meas = float(st_ref.l0)
    res = {
        "errors": errs,
        "l0": (float(st_tw.l0), a_meas),
        "l1": (float(st_tw.l1), float(st_ref.l1)),
        "overflow_rows": int(st_tw.overflow_rows),
    }
    fns = {"dense": _dense, "twell": _twell, "twell_dispatch": _twell_dispatch}
    times = {}
    for p in providers:
        f = fns[p]
        with torch.no_grad():
            fwd_ng = _time(lambda f=f: f(x, *ws), reps)
        fwd = _time(lambda f=f: f(x, *ws), reps)
        step = _time(lambda f=f: _step(f, x, ws, dy), reps)
        mem = _peak(lambda f=f: _step(f, x, ws, dy))
        for t in (x, *ws):
            t.grad = None
        times[p] = {"fwd_nograd": fwd_ng, "fwd": fwd, "fwdbwd": step, "mem": mem}
    res["times"] = times
    shape = {(2048, 5632): "paper-2048x5632", (4096, 14336): "llama3-8b-4096x14336"}.get((K, N), f"{K}x{N}")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    common = {
        "bench": "train",
        "shape": shape,
        "K": K,
        "N": N,
        "M": M,
        "active_per_token": a_meas,
        "pattern": pattern,
        "dtype": "bfloat16",
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "commit": _commit(),
        "timestamp": stamp,
        "energy_mj_per_token": None,
    }
    for op, key, bound in (("ffn_fwd", "fwd", 6 * a_meas / N), ("ffn_fwdbwd", "fwdbwd", None)):
        d_ms = times["dense"][key][0]
        # bound: dense 6MKN (fwd) / 18MKN (fwd+bwd); sparse keeps the dense gate GEMM 2MKN + 4MKa
        # (fwd) and 2MKN + 16MKa (fwd+bwd), so bound = dense / sparse FLOPs
        bnd = 3.0 / (1.0 + 2.0 * a_meas / N) if op == "ffn_fwd" else 9.0 / (1.0 + 8.0 * a_meas / N)
        del bound
        for p, tm in times.items():
            ms, p20, p80 = tm[key]
            sp = d_ms / ms
            rows.append(
                {
                    **common,
                    "op": op,
                    "provider": "dense" if p == "dense" else "twell",
                    "variant": p,
                    "ms": ms,
                    "ms_p20": p20,
                    "ms_p80": p80,
                    "tokens_per_ms": M / ms,
                    "speedup_vs_dense": sp,
                    "bound": bnd if p != "dense" else 1.0,
                    "achieved_over_bound": sp / bnd if p != "dense" else 1.0,
                    "peak_mem_mib": tm["mem"] if key == "fwdbwd" else None,
                    "fwd_nograd_ms": tm["fwd_nograd"][0],
                    "errors": {k: v[0] if p != "dense" else v[1] for k, v in errs.items()},
                }
            )
    return res


def sync_check(K=2048, N=5632, M=4096, a=30):
    """One twell training step under ``torch.cuda.set_sync_debug_mode('error')``."""
    x, wg, wu, wd = make_sparse_ffn(M, K, N, a, dtype=torch.bfloat16, device="cuda", seed=2)
    ws = [t.requires_grad_() for t in (wg, wu, wd)]
    dy = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    _step(_twell_dispatch, x.requires_grad_(), ws, dy)  # warm-up (compiles, fills caches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            _step(_twell_dispatch, x, ws, dy)
        ok = "no sync"
    except RuntimeError as e:
        ok = f"SYNC: {e}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return ok


def _warm_case(K, N, M, a, pattern):
    """Inputs of one case and two warm-up twell steps on them (compiles, fills caches)."""
    x, wg, wu, wd = make_sparse_ffn(M, K, N, a, pattern=pattern, dtype=torch.bfloat16, device="cuda", seed=1)
    ws = [t.requires_grad_() for t in (wg, wu, wd)]
    dy = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        _step(_twell, x, ws, dy)
    torch.cuda.synchronize()
    return x, ws, dy


def ncu_step(K=2048, N=5632, M=16384, a=30, pattern="iid"):
    """One twell step between cudaProfilerStart / Stop after two warm-up steps, for
    ``ncu --profile-from-start off -k regex:_wgrad_kernel ... python benchmarks/dev_train.py --ncu``
    (only the kernels of that step are profiled)."""
    x, ws, dy = _warm_case(K, N, M, a, pattern)
    torch.cuda.profiler.start()
    _step(_twell, x, ws, dy)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def profile_case(K, N, M, a, pattern="iid"):
    """Per-kernel device time of one twell step (CUDA activities of torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    x, ws, dy = _warm_case(K, N, M, a, pattern)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _step(_twell, x, ws, dy)
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" or getattr(ev, "device_time_total", 0) > 0:
            t = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
            if t > 0:
                out[ev.key[:60]] = round(t / 1000, 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:14])


SWEEP = [
    {},
    {"pack_prefetch": 2},
    {"pack_block": 256},
    {"pack_block": 512},
    {"pack_reverse": False},
    {"fwd_pairs": False},
]


def sweep(K=2048, N=5632, M=16384, a=30, pattern="iid"):
    """Per-kernel profile of one step for each launch-shape variant of ``ft.CONFIG`` (each applied
    to the module's configuration); keeps the fastest step (a variant must gain 2%) for the cases
    that follow."""
    base = ft.CONFIG
    x, wg, wu, wd = make_sparse_ffn(M, K, N, a, pattern=pattern, dtype=torch.bfloat16, device="cuda", seed=1)
    ws = [t.requires_grad_() for t in (wg, wu, wd)]
    dy = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    best = (float("inf"), base)
    for var in SWEEP:
        ft.CONFIG = dataclasses.replace(base, **var)
        try:
            step = _time(lambda: _step(_twell, x, ws, dy), 8)[0]
            if step < 0.98 * best[0] or not var:
                best = (step, ft.CONFIG)
            prof = profile_case(K, N, M, a, pattern)
            short = {k.strip("_").replace("_kernel", ""): v for k, v in prof.items() if k.startswith("_")}
            print(f"sweep {var}: step {step:.3f} ms  {short}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"sweep {var}: FAILED {repr(e)[:200]}", flush=True)
    ft.CONFIG = best[1]
    print("config used below:", ft.CONFIG, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/train-h100.jsonl")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-pattern", default="iid", help="activation pattern of the --sweep / --ncu case")
    ap.add_argument("--sweep-m", type=int, default=16384, help="tokens of the --sweep case")
    ap.add_argument("--ncu", action="store_true", help="one profiled step only (see ncu_step)")
    ap.add_argument(
        "--cases",
        default="all",
        help="'all', 'short' (paper iid, skewed, 900 dispatch) or 'none' (sweep only)",
    )
    args = ap.parse_args()
    if args.ncu:
        ncu_step(pattern=args.sweep_pattern)
        return
    if args.sweep:
        sweep(M=args.sweep_m, pattern=args.sweep_pattern)
    if args.cases == "none":
        return
    rows: list[dict] = []
    print("sync check:", sync_check(), flush=True)
    cases = [
        (2048, 5632, 16384, 30, "iid"),
        (2048, 5632, 2048, 30, "iid"),
        (2048, 5632, 16384, 30, "skewed"),
        (2048, 5632, 16384, 30, "heavy"),
    ]
    if not args.quick:
        cases += [(4096, 14336, 16384, 76, "iid")]
    try:
        print("profile paper M=16384 iid:", profile_case(2048, 5632, 16384, 30), flush=True)
    except Exception as e:  # noqa: BLE001
        print("profile failed", repr(e)[:300])
    cases += [(2048, 5632, 16384, 900, "iid", ("dense", "twell_dispatch"))]
    if args.cases == "short":
        cases = [c for c in cases if c[2] == 16384 and c[0] == 2048 and c[4] in ("iid", "skewed")]
    for case in cases:
        try:
            r = run_case(*case[:5], args.reps, rows, *case[5:])
        except Exception as e:  # noqa: BLE001 - report the failing case and go on with the others
            print("FAILED", case, repr(e)[:400], flush=True)
            continue
        t = r["times"]
        print(
            f"\n== K={case[0]} N={case[1]} M={case[2]} a={case[3]} {case[4]}  l0={r['l0']} l1={r['l1']} "
            f"ovf={r['overflow_rows']}",
            flush=True,
        )
        for p, tm in t.items():
            print(
                f"  {p:15s} fwd(nograd) {tm['fwd_nograd'][0]:.3f}  fwd {tm['fwd'][0]:.3f}  fwd+bwd "
                f"{tm['fwdbwd'][0]:.3f} ms  peak {tm['mem']:.0f} MiB  speedup fwd "
                f"{t['dense']['fwd'][0] / tm['fwd'][0]:.2f} fwd+bwd {t['dense']['fwdbwd'][0] / tm['fwdbwd'][0]:.2f}"
            )
        print(
            "  errors (twell, dense bf16) vs fp32:",
            {k: (f"{v[0]:.2e}", f"{v[1]:.2e}") for k, v in r["errors"].items()},
        )
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
