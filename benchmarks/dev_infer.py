"""Device timing of the inference kernels against the dense cuBLAS FFN (development script).

Legend: M = tokens, K = model dim, N = FFN units, a = active units per token.

Method (issue 4): 4 weight sets rotated round-robin (no call finds its weights in L2), device
time of each call measured with CUDA events while every timed call is queued behind a ~50 ms
GPU sleep (so host launch cost is not measured), median over the reps; dense = 3 ``F.linear``
(cuBLAS) + relu * mul in the same run on the same data. Rows follow DESIGN section 7.

Usage: ``PYTHONPATH=src python benchmarks/dev_infer.py --out results.jsonl [--quick]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
import triton

import twell
from twell.ops import ffn_infer as fi
from twell.ops.configs import override
from twell.ops.ffn_infer import ffn_infer
from twell.ops.gate_pack import gate_pack_arrays
from twell.testing import make_sparse_ffn

SHAPES = {
    "paper-2048x5632": (2048, 5632),
    "llama3-8b-4096x14336": (4096, 14336),
    "qwen2-0.5b-896x4864": (896, 4864),
}
#: measured roofs on the development H100 (research/reference-h100.md): bf16 GEMM and HBM copy
PEAK_FLOPS = 765e12
PEAK_BW = 3.0e12


GATE_VARIANTS = [
    ("gate_pack", {}),
    ("gate_pack:noflatten", {"flatten": False}),
    ("gate_pack:tl.store", {"use_asm_store": False}),
    ("gate_pack:plain", {"use_tma": "never"}),
    ("gate_pack:bm64", {"block_m": 64}),
    ("gate_pack:bm64-w4", {"block_m": 64, "num_warps": 4}),
    ("gate_pack:bm64-s4", {"block_m": 64, "num_stages": 4}),
    ("gate_pack:g4", {"group_m": 4}),
    ("gate_pack:g16", {"group_m": 16}),
]


def profile(shape, M, a, dtype, path="auto"):
    """Per-kernel device time (torch.profiler) of one twell forward: where the time goes."""
    K, N = SHAPES[shape]
    W = _weights(K, N, a, "iid", dtype, sets=1)
    x = _x(M, K, dtype)
    wg, wu, wd = W[0]
    with torch.no_grad():
        for _ in range(3):
            ffn_infer(x, wg, wu, wd, path=path)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                ffn_infer(x, wg, wu, wd, path=path)
            torch.cuda.synchronize()
    print(f"--- profile {shape} M={M} a={a} path={path}")
    for ev in prof.key_averages():
        if ev.device_time_total > 0:
            print(f"  {ev.key[:60]:60s} {ev.device_time_total / max(ev.count, 1):9.1f} us x{ev.count // 10}")


def decode_profile(shape, Ms, dtype, variants, rows, env):
    """Per-kernel device time (torch.profiler) of the decode path, weights rotated over 4 sets, at
    ~30 active units per token and at none (the gate alone: no unit's W_up or W_down is read)."""
    K, N = SHAPES[shape]
    for a in (30, 0):
        W = _weights(K, N, a, "iid", dtype)
        for M in Ms:
            x = _x(M, K, dtype)
            for name, ov in variants:
                with override("infer", **ov), torch.no_grad():
                    for w in W * 2:
                        ffn_infer(x, *w, path="decode")
                    torch.cuda.synchronize()
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        for _ in range(5):
                            for w in W:
                                ffn_infer(x, *w, path="decode")
                        torch.cuda.synchronize()
                kern = {
                    ev.key[:40]: ev.device_time_total / max(ev.count, 1)
                    for ev in prof.key_averages()
                    if ev.device_time_total > 0
                }
                print(
                    f"profile M={M:3d} a={a:2d} {name:14s} "
                    + "  ".join(f"{k} {v:6.1f}us" for k, v in kern.items())
                )
                rows.append(
                    {
                        "bench": "decode_profile",
                        "shape": shape,
                        "M": M,
                        "active_per_token": a,
                        "variant": name,
                        "kernel_us": kern,
                        "dtype": str(dtype).replace("torch.", ""),
                        **env,
                    }
                )


#: decode configurations compared by --decode-sweep (InferConfig overrides) at 1 < M <= max M.
#: Earlier sweeps (benchmarks/results/decode-sweep-h100-*.log) retired 2/4 stages, 8 warps,
#: 512-column K steps, a CUDA-core [BM, BN, BK] accumulator, a one-split down stage, 128 units per
#: tl.dot program and a one-launch form (the down projection in the gate kernel's last program:
#: M = 1 31.8 us against 19.4); the 3c01553 sweep retired 512/1024-column W_up steps (M = 2 24.5
#: against 21.3 us, out of shared memory at M = 4..32), 64-column steps of the atomic form's down
#: loop and the CUDA-core atomic form at M = 4 (31.2 against 24.2 us); the 7c51821 sweep retired a
#: one-launch atomic form (the last program to finish takes a ticket and writes y: M = 1 17.9
#: against 17.4 us, M = 2 22.7 against 21.4, Llama-3-8B M = 1 53.7 against 50.1); the 3411176 and
#: 5d47190 sweeps compared 32-unit tl.dot programs, 128-column down blocks, 64/128-column steps of
#: the atomic W_down^T loop, compact chunks of 32 units and 512/1024-column W_up steps, 5 stages,
#: 8 warps and 128-column gate steps with 6 stages (BENCHMARKS.md section 1e)
DECODE_VARIANTS = [
    ("decode", {}, 128),
    ("decode:no-units", {"decode_units_max_m": 0}, 8),
    ("decode:units-r4", {"decode_units_per_program": 4}, 8),
    ("decode:units-r16", {"decode_units_per_program": 16}, 8),
    (
        "decode:split",
        {
            "decode_atomic_max_m": 0,
            "decode_atomic_dot_min_m": 0,
            "decode_units_max_m": 0,
            "decode_chunk_max_m": 0,
            "decode_chunk_long_max_m": 0,
        },
        128,
    ),
    ("decode:no-chunk", {"decode_chunk_max_m": 0, "decode_chunk_long_max_m": 0}, 16),
]


def _chunk(name, **ov):
    return (f"decode:chunk{name}", {"decode_chunk_min_m": 1, "decode_chunk_max_m": 64, **ov}, 64)


#: the chunk form (compacted active units of the whole batch in tl.dot tiles) against the default
CHUNK_VARIANTS = [
    ("decode", {}, 128),
    _chunk("-s8", decode_chunk_split=8),
    _chunk("-s8-bk512-st5", decode_chunk_split=8, decode_chunk_bk=512, decode_chunk_stages=5),
    _chunk("-s8-bk1024-st3", decode_chunk_split=8, decode_chunk_bk=1024, decode_chunk_stages=3),
    _chunk("-s4-bk512-st5", decode_chunk_split=4, decode_chunk_bk=512, decode_chunk_stages=5),
    _chunk("-s16-bk512-st5", decode_chunk_split=16, decode_chunk_bk=512, decode_chunk_stages=5),
]

#: M = 1 only
M1_VARIANTS = [
    ("decode:split", {"decode_atomic_max_m": 0, "decode_atomic_dot_min_m": 0}),
    ("decode:bn4-w8", {"decode_bn_gemv": 4, "decode_gemv_warps": 8}),
    ("sparse_ffn", {}),
    ("sparse_ffn:density-every32", {"density_every": 32}),
]


def decode_sweep(shape, Ms, a, dtype, reps, env, rows, variants=None, m1_variants=None):
    """Decode path against dense for M in Ms under each of ``variants`` (default DECODE_VARIANTS;
    ``m1_variants``, default M1_VARIANTS, at M = 1) (device time)."""
    variants_all = DECODE_VARIANTS if variants is None else variants
    m1 = M1_VARIANTS if m1_variants is None else m1_variants
    K, N = SHAPES[shape]
    W = _weights(K, N, a, "iid", dtype)
    for M in Ms:
        x = _x(M, K, dtype)
        with torch.no_grad():
            d_ms = _time([(lambda w=w, x=x: _dense_ffn(x, *w)) for w in W], reps)[0]
            ref = _ref32(x, W[0])
            variants = (
                [(n, o) for n, o, top in variants_all if M <= top] if M > 1 else [variants_all[0][:2]] + m1
            )
            for name, ov in variants:
                with override("infer", **ov), warnings.catch_warnings():
                    # ffn_infer answers a decode compile failure with the dense path and a warning:
                    # here that must fail the variant, not time dense under its name
                    warnings.simplefilter("error", RuntimeWarning)
                    try:
                        if name.startswith("sparse_ffn"):  # the user entry point: dispatcher included
                            fns = [(lambda w=w, x=x: twell.sparse_ffn(x, *w)) for w in W]
                        else:
                            fns = [(lambda w=w, x=x: ffn_infer(x, *w, path="decode")) for w in W]
                        ms, p20, p80, host = _time(fns, reps)
                        err = (ffn_infer(x, *W[0], path="decode")[0].float() - ref).abs().max().item()
                    except Exception as e:  # a variant that fails to compile must not stop the sweep
                        print(f"FAILED {name} M={M}: {e!r}"[:600], flush=True)
                        fi._BROKEN.pop("decode", None)  # the next variant gets its own try
                        continue
                err /= ref.abs().max().item()
                print(
                    f"{shape:22s} M={M:4d} {name:18s} {ms * 1e3:8.1f} us  dense {d_ms * 1e3:8.1f} us"
                    f"  x{d_ms / ms:5.2f}  err {err:.1e}",
                    flush=True,
                )
                rows.append(
                    {
                        "bench": "kernels",
                        "op": "ffn_fwd",
                        "shape": shape,
                        "K": K,
                        "N": N,
                        "M": M,
                        "active_per_token": a,
                        "pattern": "iid",
                        "provider": "twell",
                        "variant": name,
                        "dtype": str(dtype).replace("torch.", ""),
                        "ms": ms,
                        "ms_p20": p20,
                        "ms_p80": p80,
                        "dense_ms": d_ms,
                        "speedup_vs_dense": d_ms / ms,
                        "bound": _bound(M, K, N, a),
                        "achieved_over_bound": d_ms / ms / _bound(M, K, N, a),
                        "host_ms_per_call": host,
                        "timing": "device-queued",
                        "max_rel_err": err,
                        **env,
                    }
                )
    torch.cuda.empty_cache()


def _commit() -> str:
    c = os.environ.get("TWELL_COMMIT")
    if c:
        return c
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def _bound(M, K, N, a):
    """Dense time over sparse time in the roofline model of DESIGN section 5."""
    dense = max(6 * M * K * N / PEAK_FLOPS, 3 * K * N * 2 / PEAK_BW)
    union = N * (1 - (1 - min(a, N) / N) ** M)
    sparse = max((2 * M * K * N + 4 * M * K * a) / PEAK_FLOPS, (K * N + 2 * K * union) * 2 / PEAK_BW)
    return dense / sparse


def _time(fns, reps):
    """Median/p20/p80 device ms of calls fns[i % len(fns)], queued behind a GPU sleep."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    # time a first call to size the sleep (host must finish enqueueing before the GPU gets there)
    t0 = time.perf_counter()
    for f in fns:
        f()
    torch.cuda.synchronize()
    per_call = (time.perf_counter() - t0) / len(fns)
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    sleep_s = min(1.0, max(0.05, 3 * reps * 300e-6))
    torch.cuda._sleep(int(sleep_s * 1.7e9))
    for i in range(reps):
        start[i].record()
        fns[i % len(fns)]()
        end[i].record()
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in zip(start, end))
    q = lambda p: ms[min(len(ms) - 1, int(p * len(ms)))]
    return q(0.5), q(0.2), q(0.8), per_call * 1e3


def _weights(K, N, a, pattern, dtype, sets=4):
    out = []
    for s in range(sets):
        _, wg, wu, wd = make_sparse_ffn(1, K, N, a, pattern=pattern, dtype=dtype, device="cuda", seed=100 + s)
        out.append((wg, wu, wd))
    return out


def _x(M, K, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
    x[:, 0] = 1.0
    return x


def _dense_ffn(x, wg, wu, wd):
    """The dense baseline: 3 cuBLAS GEMMs through F.linear, relu * mul (in x's dtype, or fp32 for
    the reference when given fp32 tensors)."""
    return F.linear(torch.relu(F.linear(x, wg)) * F.linear(x, wu), wd)


def _ref32(x, w):
    return _dense_ffn(x.float(), *(t.float() for t in w))


def run_case(shape, M, a, pattern, dtype, reps, variants, env, rows, gate=False):
    K, N = SHAPES[shape]
    W = _weights(K, N, a, pattern, dtype)
    x = _x(M, K, dtype)
    # measured active units per token (dense gate over all 4 weight sets)
    with torch.no_grad():
        act = sum(float((F.linear(x, wg) > 0).sum()) for wg, _, _ in W) / (4 * M)

    def dense(i):
        return lambda: _dense_ffn(x, *W[i])

    def twell(i, path):
        wg, wu, wd = W[i]
        return lambda: ffn_infer(x, wg, wu, wd, path=path)

    with torch.no_grad():
        d_ms, d20, d80, d_host = _time([dense(i) for i in range(4)], reps)
        results = [("dense", "dense", d_ms, d20, d80, d_host)]
        for v in variants:
            t = _time([twell(i, v) for i in range(4)], reps)
            results.append(("twell", v, *t))
        if gate:
            for name, ov in GATE_VARIANTS if gate == "all" else GATE_VARIANTS[:1]:
                with override("gate", **ov):
                    p_ms = _time([(lambda wg=w[0]: gate_pack_arrays(x, wg)) for w in W], reps)
                results.append(("twell", name, *p_ms))
            g_ms = _time([(lambda wg=w[0]: F.linear(x, wg)) for w in W], reps)
            results.append(("dense", "gate_gemm", *g_ms))
        # accuracy against the fp32 reference on weight set 0 (max-rel error, as in the tests)
        wg, wu, wd = W[0]
        ref = _ref32(x, W[0])
        y_d = dense(0)()
        y_t, _ = ffn_infer(x, wg, wu, wd)
        scale = ref.abs().max().item()
        errs = (
            (y_d.float() - ref).abs().max().item() / scale,
            (y_t.float() - ref).abs().max().item() / scale,
        )
    bound = _bound(M, K, N, act)
    print(f"  max-rel error vs fp32: dense {errs[0]:.2e}  twell {errs[1]:.2e}", flush=True)
    for provider, variant, ms, p20, p80, host in results:
        is_gate = variant.startswith("gate")
        ref = results[-1][2] if is_gate else d_ms
        sp = ref / ms
        row = {
            "bench": "kernels",
            "op": "gate_fwd" if is_gate else "ffn_fwd",
            "shape": shape,
            "K": K,
            "N": N,
            "M": M,
            "active_per_token": round(act, 2),
            "pattern": pattern,
            "provider": provider,
            "variant": variant,
            "dtype": str(dtype).replace("torch.", ""),
            "ms": ms,
            "ms_p20": p20,
            "ms_p80": p80,
            "tokens_per_ms": M / ms,
            "speedup_vs_dense": sp,
            "bound": 1.0 if is_gate else bound,
            "achieved_over_bound": sp / (1.0 if is_gate else bound),
            "peak_mem_mib": None,
            "energy_mj_per_token": None,
            "host_ms_per_call": host,
            "timing": "device-queued",
            "max_rel_err": None if is_gate else errs[1 if provider == "twell" else 0],
            **env,
        }
        rows.append(row)
        print(
            f"{shape:22s} M={M:6d} a={act:6.1f} {pattern:6s} {provider:5s} {variant:9s} "
            f"{ms:9.4f} ms  x{sp:5.2f}  bound {bound:4.2f}  host {host:.3f} ms",
            flush=True,
        )
    torch.cuda.empty_cache()


def _write_rows(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--recheck", action="store_true", help="only the cases changed after the full run")
    ap.add_argument("--decode-sweep", action="store_true", help="decode configurations for M = 1..128")
    ap.add_argument("--decode-ms", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--decode-profile", action="store_true", help="per-kernel decode time, M = 1..64")
    ap.add_argument("--chunk-sweep", action="store_true", help="chunk-form decode variants, M = 1..64")
    ap.add_argument("--chunk-wide", action="store_true", help="chunk form against the default at M = 24, 32")
    ap.add_argument(
        "--chunk-activity", action="store_true", help="chunk form against the default at 24-100 active units"
    )
    ap.add_argument("--gemv-sweep", action="store_true", help="GEMV-form decode blocks at M = 1, 2")
    ap.add_argument("--gate-ms", type=int, nargs="+", default=[2048, 16384, 131072])
    ap.add_argument("--gate-sweep", action="store_true", help="gate_pack epilogue variants, M = 2048..131072")
    args = ap.parse_args()
    dtype = torch.bfloat16
    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": _commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(env), flush=True)
    rows: list[dict] = []
    P = "paper-2048x5632"
    if args.decode_profile:
        V = [
            ("decode", {}),
            ("decode:row-major-h", {"decode_h_t": False}),
            ("decode:unswapped16", {"decode_dot_swap": False, "decode_bn_dot": 16}),
            ("decode:chunk", {"decode_chunk_min_m": 1, "decode_chunk_max_m": 64}),
        ]
        decode_profile(P, (1, 2, 8, 16, 32, 64), dtype, V, rows, env)
        _write_rows(args.out, rows)
        return 0
    if args.gate_sweep:
        for M in args.gate_ms:
            run_case(P, M, 30, "iid", dtype, args.reps, ["auto"], env, rows, gate="all")
        _write_rows(args.out, rows)
        return 0
    if args.gemv_sweep:
        # GEMV form (M <= 2): units per program x warps per program, on the three shapes
        grid = [
            (f"decode:bn{b}-w{w}", {"decode_bn_gemv": b, "decode_gemv_warps": w})
            for b in (2, 4, 8)
            for w in (2, 4, 8)
        ]
        at_2 = [("decode", {}, 2)] + [(n, o, 2) for n, o in grid]
        for shape in SHAPES:
            decode_sweep(shape, (1, 2), 30, dtype, args.reps, env, rows, variants=at_2, m1_variants=grid)
        _write_rows(args.out, rows)
        return 0
    if args.chunk_wide or args.chunk_activity:
        # the default path against the chunk form forced on (up to `top` tokens)
        L = "llama3-8b-4096x14336"
        if args.chunk_wide:
            top, cases = 32, [(sh, (24, 32), a) for a in (30, 100) for sh in (P, L)]
        else:
            top, cases = 16, [(P, (6, 8), a) for a in (24, 36, 100)] + [(L, (8, 16), a) for a in (30, 100)]
        ov = {"decode_chunk_max_m": 32 if args.chunk_wide else 8, "decode_chunk_long_max_m": top}
        on = [("decode", {}, 128), ("decode:chunk-on", ov, top)]
        for shape, ms, a in cases:
            decode_sweep(shape, ms, a, dtype, args.reps, env, rows, on, [])
        _write_rows(args.out, rows)
        return 0
    if args.chunk_sweep:
        m1 = [(n, o) for n, o, _ in CHUNK_VARIANTS[1:4]]
        decode_sweep(P, tuple(args.decode_ms), 30, dtype, args.reps, env, rows, CHUNK_VARIANTS, m1)
        llama_ms = tuple(m for m in args.decode_ms if m <= 16)
        decode_sweep(
            "llama3-8b-4096x14336", llama_ms, 30, dtype, args.reps, env, rows, CHUNK_VARIANTS[:6], m1
        )
        _write_rows(args.out, rows)
        return 0
    if args.decode_sweep:
        decode_sweep(P, tuple(args.decode_ms), 30, dtype, args.reps, env, rows)
        llama_ms = tuple(m for m in args.decode_ms if m in (1, 6, 8, 12, 16)) or (1,)
        decode_sweep("llama3-8b-4096x14336", llama_ms, 30, dtype, args.reps, env, rows)
        _write_rows(args.out, rows)
        return 0
    if args.profile:
        for M, path in (
            ((1, "decode"), (16384, "prefill"))
            if args.recheck
            else ((1, "decode"), (8, "decode"), (16, "decode"), (64, "decode"), (16384, "prefill"))
        ):
            profile(P, M, 30, dtype, path)
    d = ["auto", "decode"]
    L, Q = "llama3-8b-4096x14336", "qwen2-0.5b-896x4864"
    cases = [
        (P, 1, 30, "iid", d, False),
        (P, 2, 30, "iid", d, False),
        (P, 4, 30, "iid", d, False),
        (P, 8, 30, "iid", d, False),
        (P, 64, 30, "iid", d, False),
        (P, 256, 30, "iid", ["auto", "prefill"], False),
        (P, 1024, 30, "iid", ["auto", "prefill"], False),
        (P, 2048, 30, "iid", ["auto"], True),
        (P, 16384, 30, "iid", ["auto"], "all"),
        (P, 131072, 30, "iid", ["auto"], True),
        (P, 1, 30, "skewed", ["auto"], False),
        (P, 64, 30, "skewed", ["auto"], False),
        (P, 2048, 30, "skewed", ["auto"], False),
        (P, 16384, 30, "skewed", ["auto"], False),
        (P, 1, 100, "iid", ["auto"], False),
        (P, 2048, 100, "iid", ["auto", "prefill"], False),
        (P, 16384, 100, "iid", ["auto", "prefill"], False),
        (P, 8, 900, "iid", ["auto"], False),
        (P, 2048, 900, "iid", ["auto"], False),
        (L, 1, 30, "iid", ["auto"], False),
        (L, 64, 30, "iid", ["auto"], False),
        (L, 2048, 30, "iid", ["auto"], False),
        (L, 16384, 30, "iid", ["auto"], False),
        (Q, 1, 30, "iid", ["auto"], False),
        (Q, 2048, 30, "iid", ["auto"], False),
    ]
    if args.recheck:
        cases = [
            (P, 1, 30, "iid", ["auto", "decode"], False),
            (P, 1, 30, "skewed", ["auto"], False),
            (P, 1, 100, "iid", ["auto"], False),
            (L, 1, 30, "iid", ["auto"], False),
            (Q, 1, 30, "iid", ["auto"], False),
            (P, 16384, 30, "iid", ["auto"], False),
            (P, 8, 30, "iid", ["auto"], False),
        ]
    if args.quick:
        cases = [c for c in cases if c[0] == P and c[2] == 30 and c[3] == "iid"]
    for shape, M, a, pattern, variants, gate in cases:
        try:
            run_case(shape, M, a, pattern, dtype, args.reps, variants, env, rows, gate)
        except Exception as e:  # record and go on: one failing case must not lose the others
            print(f"FAILED {shape} M={M} a={a} {pattern}: {e!r}"[:800], flush=True)
        _write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
