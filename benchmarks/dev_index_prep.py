"""Development probe: device time of the training backward's index preparation.

``_items_kernel`` (offsets, work items, multi flags) and ``_item_units_kernel`` (item -> unit) at
several block sizes and warp counts, against the torch ops they replaced, at the paper shape
(N = 5632 units, M = 16384 tokens, W = 256). Device time from torch.profiler (back-to-back launch
timing of kernels this small measures the host). Needs CUDA.

    PYTHONPATH=src python benchmarks/dev_index_prep.py
"""

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from twell.ops import ffn_train as ft

N, M, W, CH = 5632, 16384, 256, 128
E = M * W
N_ITEMS = (E + CH - 1) // CH + N


def dev_us(fn, n: int = 20) -> float:
    """Mean device time of ``fn`` in microseconds (every CUDA kernel it launches)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    evs = [ev for ev in prof.key_averages() if ev.device_type.name == "CUDA"]
    return sum(getattr(ev, "device_time_total", 0) or 0 for ev in evs) / n


def main():
    dev = "cuda"
    ucnt = torch.randint(70, 110, (N,), dtype=torch.int32, device=dev)
    uoff = torch.empty(N + 1, dtype=torch.int64, device=dev)
    se = torch.empty(2, N, dtype=torch.int64, device=dev)
    multi = torch.empty(N, dtype=torch.int32, device=dev)
    flags = torch.empty(2, N, dtype=torch.int32, device=dev)
    unit = torch.empty(N_ITEMS, dtype=torch.int32, device=dev)

    def torch_ops():
        uo = torch.zeros((N + 1,), dtype=torch.int64, device=dev)
        torch.cumsum(ucnt, 0, out=uo[1:])
        torch.zeros((2, N), dtype=torch.int32, device=dev)
        spilled = uo[1:] > E
        items = torch.where(spilled, 1, ((ucnt.to(torch.int64) + CH - 1) // CH).clamp(min=1))
        end = torch.cumsum(items, 0)
        _ = end - items
        torch.searchsorted(end, torch.arange(N_ITEMS, device=dev), right=True).to(torch.int32)
        (spilled | (ucnt > CH)).to(torch.int32)

    print(f"torch ops: {dev_us(torch_ops):.1f} us")
    for bn, nw in ((1024, 4), (1024, 8), (2048, 8), (4096, 8), (4096, 16), (8192, 16), (8192, 32)):

        def items(bn=bn, nw=nw):
            ft._k("items")[(1,)](ucnt, uoff, se[0], se[1], multi, flags, N, E, CH, BN=bn, num_warps=nw)

        print(f"_items_kernel BN={bn} warps={nw}: {dev_us(items):.1f} us")
    for bi, nw in ((1024, 4), (256, 4), (512, 4), (256, 2)):

        def item_units(bi=bi, nw=nw):
            grid = (triton.cdiv(N_ITEMS, bi),)
            ft._k("item_units")[grid](se[1], unit, N, N_ITEMS, N.bit_length(), BI=bi, num_warps=nw)

        print(f"_item_units_kernel BI={bi} warps={nw}: {dev_us(item_units):.1f} us")


if __name__ == "__main__":
    main()
