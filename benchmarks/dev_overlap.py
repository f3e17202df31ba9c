"""Prefill with gate_pack and up/down on two streams over chunks of rows (a negative result,
``docs/kernels.md`` section 3): gate_pack of chunk i on the current stream, ``_updown_kernel`` of
chunk i on a side stream, optionally with the persistent gate grid capped to leave SMs free.

Usage on a CUDA machine: ``PYTHONPATH=src python benchmarks/dev_overlap.py out.json``
"""

import json
import sys

import torch
import torch.nn.functional as F

from twell.bench.timing import time_calls
from twell.ops import ffn_infer as fi
from twell.ops import gate_pack as gp
from twell.testing import make_sparse_ffn

TILE, SLOTS = 256, 32


def run_chunked(x, wg, wu, wd, chunk, side=None):
    """The prefill of ``x`` in chunks of rows; with ``side`` the up/down stage runs on that stream."""
    M, K = x.shape
    NT = (wg.shape[0] + TILE - 1) // TILE
    counts = torch.empty((M, NT), dtype=torch.int32, device=x.device)
    values = torch.empty((M, NT, SLOTS), dtype=x.dtype, device=x.device)
    columns = torch.empty((M, NT, SLOTS), dtype=torch.int16, device=x.device)
    y = torch.empty((M, K), dtype=x.dtype, device=x.device)
    tok = torch.empty((M, 4), dtype=torch.float32, device=x.device)
    wdt = fi.down_t(wd)
    main = torch.cuda.current_stream()
    for r0 in range(0, M, chunk):
        r = slice(r0, min(M, r0 + chunk))
        gp.launch_gate_pack(x[r], wg, TILE, SLOTS, counts[r], values[r], columns[r], None)
        args = (x[r], counts[r], values[r], columns[r], wg, wu, wdt, y[r], tok[r], TILE, SLOTS)
        if side is None:
            fi._launch_updown(*args)
            continue
        side.wait_stream(main)
        with torch.cuda.stream(side):
            fi._launch_updown(*args)
    if side is not None:
        main.wait_stream(side)
    return y


def dev_ms(fn):
    """Median device time of ``fn`` queued behind a GPU sleep (host launch cost not counted)."""
    return time_calls([fn], "cuda", methods=("queued",))["queued"].ms


def main(out):
    side = torch.cuda.Stream()
    real_sms = gp.num_sms
    rows = []
    cases = ((16384, (1536, 2048, 4096, 8192)), (2048, (512, 1024)), (131072, (8192, 16384)))
    with torch.no_grad():
        for M, chunks in cases:
            x, wg, wu, wd = make_sparse_ffn(M, 2048, 5632, 30, dtype=torch.bfloat16, device="cuda", seed=1)
            ref = run_chunked(x, wg, wu, wd, M)
            dense = dev_ms(
                lambda x=x, wg=wg, wu=wu, wd=wd: F.linear(torch.relu(F.linear(x, wg)) * F.linear(x, wu), wd)
            )
            serial = dev_ms(lambda x=x, wg=wg, wu=wu, wd=wd, M=M: run_chunked(x, wg, wu, wd, M))
            print(f"M={M} dense {dense:.4f} serial {serial:.4f} ({dense / serial:.2f}x)", flush=True)
            for c in chunks:
                for sms in (None, 112, 96):
                    gp.num_sms = real_sms if sms is None else (lambda dev, s=sms: s)
                    w = (x, wg, wu, wd, c)
                    two = dev_ms(lambda w=w: run_chunked(*w, side=side))
                    one = dev_ms(lambda w=w: run_chunked(*w))
                    err = (run_chunked(*w, side=side).float() - ref.float()).abs().max().item()
                    print(
                        f"   chunk {c:6d} gate_sms {sms} 2 streams {two:.4f} ({dense / two:.2f}x)"
                        f"  1 stream {one:.4f}  maxdiff {err:.2e}",
                        flush=True,
                    )
                    rows.append(dict(M=M, chunk=c, sms=sms, two=two, one=one, dense=dense, serial=serial))
            gp.num_sms = real_sms
    # registers and shared memory of the two kernels: can they share an SM?
    for name, fn in (("updown", fi._updown_kernel), ("gate_tma", gp._gate_pack_tma_kernel)):
        for ck in fn.device_caches[0][0].values():
            print(
                name,
                "regs",
                ck.n_regs,
                "spills",
                ck.n_spills,
                "shared",
                ck.metadata.shared,
                "warps",
                ck.metadata.num_warps,
            )
    with open(out, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main(sys.argv[1])
