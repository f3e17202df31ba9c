"""Per-kernel device time (torch.profiler) of the inference paths under config overrides
(development script).

Legend: M = tokens, K = model dim, N = FFN units, a = active units per token.

For each M and each override (a JSON object of ``InferConfig`` fields for ``decode``, of
``TrainConfig`` fields for ``prefill``, whose rows form runs ``ffn_train.rows_forward``), prints
one line: the override, the largest error against the reference relative to the reference's
largest value, and the average device time of every kernel over 8 calls (4 weight sets rotated,
so no call finds its weights in L2). Kernels launched with programmatic dependent launch start
before their predecessor ends, so their times overlap: the sum is not the call's time (use
``twell bench kernels`` for that).

Usage: ``PYTHONPATH=src python benchmarks/profile_kernels.py decode --M 16 64 --shape 4096,14336
--cfg '{}' '{"decode_union_max_m": 0}'``
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from torch.profiler import ProfilerActivity, profile

from twell.ops import ffn_train as ft
from twell.ops.configs import override
from twell.ops.ffn_infer import ffn_infer
from twell.testing import make_sparse_ffn


def _call(path, sets, i):
    x, wg, wu, wd, wdt = sets[i % len(sets)]
    if path == "prefill":
        return ft.rows_forward(x, wg, wu, wdt, tile=256, slots=32, unit_counts=False)[0]
    return ffn_infer(x, wg, wu, wd, path="decode")[0]


def _kernel_us(path, sets):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(8):
            _call(path, sets, i)
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", 0)
        if t > 0:
            out[ev.key[:40]] = round(t / 8, 1)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", choices=["prefill", "decode"])
    ap.add_argument("--M", type=int, nargs="+", default=[64])
    ap.add_argument("--shape", default="2048,5632", help="K,N")
    ap.add_argument("--active", type=float, default=30.0)
    ap.add_argument("--pattern", default="iid", choices=["iid", "skewed"])
    ap.add_argument("--cfg", nargs="+", default=["{}"], help="JSON overrides, one run each")
    args = ap.parse_args(argv)
    K, N = (int(v) for v in args.shape.split(","))
    base_t = ft.CONFIG
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for M in args.M:
        sets = []
        for s in range(4):
            x, wg, wu, wd = make_sparse_ffn(
                M, K, N, args.active, pattern=args.pattern, dtype=torch.bfloat16, device="cuda", seed=1 + s
            )
            sets.append((x, wg, wu, wd, wd.t().contiguous()))
        x, wg, wu, wd, _ = sets[0]
        y_ref = ffn_infer(x, wg, wu, wd, path="reference")[0].float()
        for text in args.cfg:
            cfg = json.loads(text)
            infer = cfg if args.path == "decode" else {}
            try:
                ft.CONFIG = dataclasses.replace(base_t, **(cfg if args.path == "prefill" else {}))
                with override("infer", **infer):
                    for i in range(6):
                        _call(args.path, sets, i)
                    err = ((_call(args.path, sets, 0).float() - y_ref).abs().max() / y_ref.abs().max()).item()
                    times = _kernel_us(args.path, sets)
            finally:
                ft.CONFIG = base_t
            print(f"M={M} {text} relerr {err:.1e} kernels(us) {json.dumps(times)}", flush=True)


if __name__ == "__main__":
    main()
