"""``twell demo``: a small end-to-end job on the default device.

Builds a small gated-ReLU FFN whose gate fires for about ``--active`` of its units per token, runs
the sparse FFN, packs its activations into TwELL and prints active units per token, the overflow
count and the packed size against dense.
"""

from __future__ import annotations

import argparse

import torch

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=512, help="tokens M (default 512)")
    p.add_argument("--hidden", type=int, default=256, help="model dim K (default 256)")
    p.add_argument("--ffn", type=int, default=1024, help="FFN units N (default 1024)")
    p.add_argument("--active", type=float, default=12.0, help="target active units per token (default 12)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    import twell
    from twell.testing import make_sparse_ffn

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, wg, wu, wd = make_sparse_ffn(
        args.tokens, args.hidden, args.ffn, args.active, dtype=dtype, device=device
    )
    with torch.no_grad():
        y, st = twell.sparse_ffn(x, wg, wu, wd, return_stats=True)
        y_dense = twell.sparse_ffn(x, wg, wu, wd, backend="reference")
        h = torch.relu(x @ wg.T) * (x @ wu.T)
    packed = twell.TwELL.from_dense(h)
    exact = torch.equal(packed.to_dense(), torch.relu(h))
    dense_bytes = h.numel() * h.element_size()

    console = Console()
    table = Table(
        title=f"twell demo: sparse FFN M={args.tokens} K={args.hidden} N={args.ffn} on {device} ({dtype})"
    )
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("active units per token (l0)", f"{float(st.l0):.2f} of {args.ffn}")
    table.add_row("zeros in the FFN hidden", f"{100 * (1 - float(st.l0) / args.ffn):.2f} %")
    table.add_row("tokens with an overflowing tile (> 32 in 256)", f"{int(st.overflow_rows)}")
    table.add_row("TwELL round trip exact", "yes" if exact else "NO")
    table.add_row(
        "packed size / dense size",
        f"{packed.nbytes() / 1024:.1f} KiB / {dense_bytes / 1024:.1f} KiB "
        f"({packed.nbytes() / dense_bytes:.1%})",
    )
    err = (y.float() - y_dense.float()).abs().max() / y_dense.float().abs().max()
    table.add_row("sparse_ffn vs reference (max rel err)", f"{float(err):.2e}")
    console.print(table)
    return 0 if exact else 1
