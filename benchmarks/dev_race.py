"""Repeated decode calls against the fp32 reference: counts calls whose output is wrong (a race
shows as an error that moves between calls on the same inputs). Development script (CUDA).

Legend: M = tokens, K = model dim, N = FFN units.

For each case the same inputs go through ``ffn_infer(path="decode")`` ``--calls`` times; a call is
wrong when max |y - y_ref| / max |y_ref| > 0.05 (rounding gives ~4e-3 in bf16). For wrong calls
it prints the worst row and the range of wrong columns.

Usage: ``PYTHONPATH=src python benchmarks/dev_race.py [--calls 250] [--atomic-dot]``
"""

from __future__ import annotations

import argparse

import torch

from twell.ops.configs import override
from twell.ops.ffn_infer import ffn_infer
from twell.ops.ffn_ref import sparse_ffn_ref
from twell.testing import make_sparse_ffn

SHAPES = {"paper": (2048, 5632), "llama3-8b": (4096, 14336)}


def run_case(shape: str, M: int, dense_row: int | None, calls: int, overrides: dict) -> int:
    K, N = SHAPES[shape]
    x, wg, wu, wd = make_sparse_ffn(M, K, N, 30, dtype=torch.bfloat16, device="cuda", seed=19)
    if dense_row is not None:
        x[dense_row, 0] = -40.0  # column 0 carries the threshold: every unit active for this token
    with torch.no_grad():
        y32, _ = sparse_ffn_ref(x.float(), wg.float(), wu.float(), wd.float())
    scale = y32.abs().max()
    wrong = []
    with override("infer", **overrides), torch.no_grad():
        for i in range(calls):
            y, _ = ffn_infer(x, wg, wu, wd, path="decode")
            e = (y.float() - y32).abs() / scale
            if e.max().item() > 0.05:
                r = int(e.amax(1).argmax())
                cols = (e[r] > 0.05).nonzero().flatten()
                wrong.append((i, r, int(cols.min()), int(cols.max())))
    print(
        f"{shape} M={M} dense_row={dense_row} {overrides}: {len(wrong)}/{calls} wrong"
        + (f"; (call, row, first, last wrong column) {wrong[:5]}" if wrong else ""),
        flush=True,
    )
    return len(wrong)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=250)
    ap.add_argument(
        "--atomic-dot",
        action="store_true",
        help="also the tl.dot atomic form without compaction and without programmatic dependent launch",
    )
    ap.add_argument("--chunk", action="store_true", help="also the chunk form (M = 4..16)")
    args = ap.parse_args()
    cases = [
        ("llama3-8b", 1, 0, {}),
        ("llama3-8b", 2, 1, {}),
        ("paper", 1, 0, {}),
        ("llama3-8b", 8, 7, {}),
        ("llama3-8b", 8, None, {}),
        ("llama3-8b", 32, 31, {}),
        ("paper", 8, 7, {}),
    ]
    if args.chunk:
        ch = dict(decode_chunk_min_m=3, decode_chunk_max_m=16, decode_chunk_split=8, decode_chunk_bk=512)
        cases += [
            ("llama3-8b", 8, 7, ch),
            ("llama3-8b", 8, None, ch),
            ("llama3-8b", 16, 15, ch),
            ("paper", 4, 3, ch),
        ]
    if args.atomic_dot:
        cases += [
            ("llama3-8b", 8, 7, dict(decode_atomic_compact=False)),
            ("llama3-8b", 8, None, dict(decode_atomic_compact=False)),
            ("llama3-8b", 8, 7, dict(decode_pdl=False)),
            ("llama3-8b", 64, 63, {}),
            ("paper", 64, 63, {}),
        ]
    bad = sum(run_case(*c[:3], args.calls, c[3]) for c in cases)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
