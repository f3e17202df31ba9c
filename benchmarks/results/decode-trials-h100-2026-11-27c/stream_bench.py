"""W_gate streaming microbenchmark: time to read a [N, K] bf16 matrix (4 copies rotated, so the
reads come from HBM) as tl.dot tiles of [R rows, BK columns] against x [BM, K], with a
persistent grid of P programs each taking a contiguous range of (row block, K block) items."""

import json
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _stream(
    w_ptr,
    x_ptr,
    out_ptr,
    N,
    K,
    R: tl.constexpr,
    BK: tl.constexpr,
    BM: tl.constexpr,
    STAGES: tl.constexpr,
    HOIST: tl.constexpr,
    DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    n_k = K // BK
    total = (N // R) * n_k
    per = tl.cdiv(total, P)
    lo = pid * per
    hi = tl.minimum(lo + per, total)
    i_m = tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    o_r = tl.arange(0, R)
    if HOIST:
        xh = tl.load(x_ptr + i_m[None, :] * K + o_k[:, None])
    acc = tl.zeros((R, BM), dtype=tl.float32)
    for it in tl.range(lo, hi, num_stages=STAGES):
        rb = it // n_k
        kb = it % n_k
        w = tl.load(w_ptr + (rb * R + o_r)[:, None].to(tl.int64) * K + (kb * BK + o_k)[None, :])
        if DOT:
            if HOIST:
                x = xh
            else:
                x = tl.load(x_ptr + i_m[None, :] * K + (kb * BK + o_k)[:, None])
            acc = tl.dot(w, x, acc)
        else:
            acc += tl.sum(w.to(tl.float32), axis=1)[:, None]
    tl.store(out_ptr + pid * R * BM + o_r[:, None] * BM + i_m[None, :], acc)


def main():
    N, K = 5632, 2048
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    x = torch.randn(16, K, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(132 * 64 * 16, device="cuda", dtype=torch.float32)
    rows = []
    cases = []
    for P in (88, 132):
        for R, BK, ST, warps in (
            (64, 256, 4, 4),
            (64, 512, 3, 4),
            (32, 512, 4, 4),
            (16, 1024, 4, 4),
            (16, 2048, 2, 4),
            (16, 2048, 3, 4),
            (32, 2048, 2, 8),
            (64, 128, 6, 4),
            (128, 256, 3, 8),
            (16, 2048, 2, 8),
        ):
            cases.append((P, R, BK, ST, warps, True))
    cases += [(132, 16, 2048, 3, 4, False), (132, 64, 256, 4, 4, False), (264, 16, 2048, 2, 4, False)]
    for P, R, BK, ST, warps, dot in cases:
        hoist = BK == K
        args = dict(R=R, BK=BK, BM=16, STAGES=ST, HOIST=hoist, DOT=dot, num_warps=warps)
        try:
            for w in ws:
                _stream[(P,)](w, x, out, N, K, **args)
            torch.cuda.synchronize()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            n = 200
            torch.cuda._sleep(50_000_000)
            ev[0].record()
            for i in range(n):
                _stream[(P,)](ws[i % 4], x, out, N, K, **args)
            ev[1].record()
            torch.cuda.synchronize()
            us = ev[0].elapsed_time(ev[1]) * 1e3 / n
            row = dict(
                P=P,
                R=R,
                BK=BK,
                stages=ST,
                warps=warps,
                dot=dot,
                us=round(us, 2),
                TBps=round(N * K * 2 / us / 1e6, 3),
            )
        except Exception as e:
            row = dict(P=P, R=R, BK=BK, stages=ST, warps=warps, dot=dot, error=repr(e)[:200])
        print(json.dumps(row), flush=True)
        rows.append(row)
    # cuBLAS GEMV-like reference: x[16, K] @ W^T, and a plain read (sum) of W
    for name, fn in (
        ("cublas_mm_m16", lambda w: torch.matmul(x, w.t())),
        ("cublas_mm_m1", lambda w: torch.matmul(x[:1], w.t())),
        ("torch_sum", lambda w: w.sum(dtype=torch.float32)),
    ):
        for w in ws:
            fn(w)
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        torch.cuda._sleep(50_000_000)
        ev[0].record()
        for i in range(200):
            fn(ws[i % 4])
        ev[1].record()
        torch.cuda.synchronize()
        us = ev[0].elapsed_time(ev[1]) * 1e3 / 200
        row = dict(name=name, us=round(us, 2), TBps=round(N * K * 2 / us / 1e6, 3))
        print(json.dumps(row), flush=True)
        rows.append(row)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
