"""Whole-call device time of the decode (or another) path under config overrides (development script).

Legend: M = tokens, K = model dim, N = FFN units.

For each M, builds 4 weight sets (rotated, so no call finds its weights in L2) with the given
active units per token, times the dense FFN (three cuBLAS GEMMs) once, then ``ffn_infer(...,
path="decode")`` under each override (a JSON object of ``InferConfig`` fields), queued behind a GPU
sleep as ``twell bench kernels`` does. Appends one JSON row per (M, override) to OUT: the
override, device time, dense time, their ratio and the largest error against the reference
relative to the reference's largest value (or the error message, e.g. out of shared memory).
Keys of an override that start with ``train.`` change the training kernels' ``CONFIG`` (whose
row kernels the prefill runs), ``gate.`` keys the ``GateConfig`` of the gate GEMMs; ``--path
NAME`` (first) times ``path=NAME`` instead of decode.

Usage: ``PYTHONPATH=src python benchmarks/sweep_decode.py OUT.jsonl 2048,5632 30 iid 48,64 '{}'
'{"decode_union_min_k": 4096}'``; ``... sweep_decode.py --path prefill OUT.jsonl 2048,5632 30 iid
16384 '{}' '{"prefill_rows_chunk": 4096}' '{"train.row_warps": 8}'``
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys

import torch

from twell.bench.runner import dense_ffn
from twell.bench.timing import time_calls
from twell.ops import ffn_train
from twell.ops.configs import override
from twell.ops.ffn_infer import ffn_infer
from twell.testing import make_sparse_ffn


@contextlib.contextmanager
def _configs(cfg: dict):
    """``InferConfig`` fields of ``cfg`` through ``override``; ``train.*`` keys on ffn_train.CONFIG,
    ``gate.*`` keys on the ``GateConfig`` of gate_pack and gate_bits."""
    train = {k[len("train.") :]: v for k, v in cfg.items() if k.startswith("train.")}
    gate = {k[len("gate.") :]: v for k, v in cfg.items() if k.startswith("gate.")}
    old = ffn_train.CONFIG
    ffn_train.CONFIG = dataclasses.replace(old, **train)
    try:
        with (
            override("infer", **{k: v for k, v in cfg.items() if not k.startswith(("train.", "gate."))}),
            override("gate", **gate),
        ):
            yield
    finally:
        ffn_train.CONFIG = old


def _rows(shape: str, active: float, pattern: str, ms: list[int], cfgs: list[str], path: str = "decode"):
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
            row = {"K": K, "N": N, "M": M, "active": active, "pattern": pattern, "path": path}
            row["cfg"] = json.loads(text)
            try:
                with _configs(row["cfg"]):
                    fns = [lambda s=s: ffn_infer(*s, path=path) for s in sets]
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
    path = "decode"
    if argv[:1] == ["--path"] and len(argv) > 1:
        path, argv = argv[1], argv[2:]
    if len(argv) < 5:
        raise SystemExit(__doc__)
    out, shape, active, pattern, ms = argv[:5]
    with open(out, "a") as f:
        for row in _rows(
            shape, float(active), pattern, [int(v) for v in ms.split(",")], argv[5:] or ["{}"], path
        ):
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
