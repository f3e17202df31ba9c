"""Whole-call device time of the decode path under ``InferConfig`` overrides (development script).

Legend: M = tokens, K = model dim, N = FFN units.

For each M, builds 4 weight sets (rotated, so no call finds its weights in L2) with the given
active units per token, times the dense FFN (three cuBLAS GEMMs) once, then ``ffn_infer(...,
path="decode")`` under each override (a JSON object of ``InferConfig`` fields), queued behind a GPU
sleep as ``twell bench kernels`` does. Appends one JSON row per (M, override) to OUT: the
override, device time, dense time, their ratio and the largest error against the reference
relative to the reference's largest value (or the error message, e.g. out of shared memory).

Usage: ``PYTHONPATH=src python benchmarks/sweep_decode.py OUT.jsonl 2048,5632 30 iid 48,64 '{}'
'{"decode_union_min_k": 4096}'``
"""

from __future__ import annotations

import json
import sys

import torch

from twell.bench.runner import dense_ffn
from twell.bench.timing import time_calls
from twell.ops.configs import override
from twell.ops.ffn_infer import ffn_infer
from twell.testing import make_sparse_ffn


def _rows(shape: str, active: float, pattern: str, ms: list[int], cfgs: list[str]):
    K, N = (int(v) for v in shape.split(","))
    for M in ms:
        sets = [
            make_sparse_ffn(M, K, N, active, pattern=pattern, dtype=torch.bfloat16, device="cuda", seed=1 + s)
            for s in range(4)
        ]
        y_ref = ffn_infer(*sets[0], path="reference")[0].float()
        dense_ms = time_calls([lambda s=s: dense_ffn(*s) for s in sets], "cuda", methods=("queued",))[
            "queued"
        ].ms
        for text in cfgs:
            row = {"K": K, "N": N, "M": M, "active": active, "pattern": pattern, "cfg": json.loads(text)}
            try:
                with override("infer", **row["cfg"]):
                    fns = [lambda s=s: ffn_infer(*s, path="decode") for s in sets]
                    err = (fns[0]()[0].float() - y_ref).abs().max() / y_ref.abs().max()
                    ms_ = time_calls(fns, "cuda", methods=("queued",))["queued"].ms
                row.update(
                    us=round(ms_ * 1e3, 2),
                    dense_us=round(dense_ms * 1e3, 2),
                    speedup=round(dense_ms / ms_, 3),
                    relerr=float(err),
                )
            except Exception as e:  # an override may not compile (shared memory): keep sweeping
                row["error"] = repr(e)[:300]
            yield row


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 5:
        raise SystemExit(__doc__)
    out, shape, active, pattern, ms = argv[:5]
    with open(out, "a") as f:
        for row in _rows(shape, float(active), pattern, [int(v) for v in ms.split(",")], argv[5:] or ["{}"]):
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
