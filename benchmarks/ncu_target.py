"""One profiled FFN call per case, for Nsight Compute (``benchmarks/ncu_kernels.sh``).

Each case warms up (compilation, density estimate), then runs one twell call and one dense
cuBLAS FFN call between ``cudaProfilerStart``/``Stop``, so ``ncu --profile-from-start off`` sees
exactly those kernels (with its default cache control: L2 flushed before each kernel, the cold
weights of a real layer).

Usage (under ncu): ``python benchmarks/ncu_target.py [M ...]`` (default 1 8 2048 16384).
"""

import sys

import torch
import torch.nn.functional as F

from twell.ops.ffn_infer import ffn_infer
from twell.testing import make_sparse_ffn


def main(ms):
    with torch.no_grad():
        for M in ms:
            x, wg, wu, wd = make_sparse_ffn(M, 2048, 5632, 30, dtype=torch.bfloat16, device="cuda", seed=1)
            for _ in range(3):
                ffn_infer(x, wg, wu, wd)
                F.linear(torch.relu(F.linear(x, wg)) * F.linear(x, wu), wd)
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_push(f"M={M}")
            torch.cuda.profiler.start()
            ffn_infer(x, wg, wu, wd)
            F.linear(torch.relu(F.linear(x, wg)) * F.linear(x, wu), wd)
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            torch.cuda.nvtx.range_pop()


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1, 8, 2048, 16384])
