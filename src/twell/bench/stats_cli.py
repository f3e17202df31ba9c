"""``twell stats MODEL --data PATH``: where a model's FFN activations are sparse, and how.

Legend: N = FFN units per layer, T = TwELL tile width, S = slots per (token, tile).

Runs a local Hugging Face model (sparsified with :func:`twell.sparsify_` when it is a ReLU model
and not already sparse) over text and reports, per layer:

- active units per token: mean, p50, p99, max (active = gate pre-activation > 0);
- dead units (never active over the run) and hot units (active on more than ``--hot`` of tokens);
- TwELL tile occupancy: the distribution of active units per (token, tile of T columns) against
  the S slots, and the share of tokens with an overflowing tile (computed exactly by the kernels'
  fallback, but slower);
- the batch-union density u(M): the fraction of units active in at least one of M tokens drawn
  from different places of the text, which bounds decode speedups (``3 / (1 + 2 u)``), next to the
  independent-token prediction ``1 - (1 - rho)^M``;
- when the model runs twell's sparse MLPs, twell's own ``l0`` for the same tokens (a cross-check).

Writes ``report.txt``, ``stats.json`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["add_arguments", "run", "LayerStats", "collect_stats", "write_report"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local Hugging Face model directory")
    p.add_argument("--data", required=True, help="text: a .txt/.jsonl/.json file or a directory of them")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch", type=int, default=4, help="sequences per forward (default 4)")
    p.add_argument("--max-tokens", type=int, default=65536, help="tokens to analyse at most (default 65536)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--tile", type=int, default=256, help="TwELL tile width T (default 256)")
    p.add_argument("--slots", type=int, default=32, help="TwELL slots S per (token, tile) (default 32)")
    p.add_argument(
        "--hot", type=float, default=0.5, help="a unit is hot above this firing rate (default 0.5)"
    )
    p.add_argument("--union-tokens", type=int, default=2048, help="tokens sampled for u(M) (default 2048)")
    p.add_argument(
        "--sparsify",
        choices=("auto", "yes", "no"),
        default="auto",
        help="swap in twell's sparse MLPs (auto: when the model is ReLU and not yet sparse)",
    )
    p.add_argument("--out", default=None, help="output directory (default twell-stats-<model name>)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--seed", type=int, default=0)


@dataclass
class LayerStats:
    """Accumulated statistics of one gated MLP (see the module docstring)."""

    name: str
    N: int
    tile: int
    slots: int
    per_token: list[torch.Tensor] = field(default_factory=list)
    unit_counts: torch.Tensor | None = None
    tile_hist: torch.Tensor | None = None
    overflow_tokens: int = 0
    tokens: int = 0
    union_sample: list[torch.Tensor] = field(default_factory=list)
    union_kept: int = 0
    twell_l0_sum: float = 0.0
    twell_tokens: int = 0

    def add(self, active: torch.Tensor, keep: torch.Tensor | None, union_cap: int) -> None:
        """``active [M, N]`` bool of one forward; ``keep [M]`` bool selects tokens for u(M)."""
        M, N = active.shape
        NT = -(-N // self.tile)
        self.per_token.append(active.sum(1, dtype=torch.int32).cpu())
        uc = active.sum(0, dtype=torch.int64).cpu()
        self.unit_counts = uc if self.unit_counts is None else self.unit_counts + uc
        pad = torch.zeros(M, NT * self.tile, dtype=torch.int32, device=active.device)
        pad[:, :N] = active
        per_tile = pad.view(M, NT, self.tile).sum(-1)
        hist = torch.bincount(per_tile.flatten().cpu().long(), minlength=self.tile + 1)
        self.tile_hist = hist if self.tile_hist is None else self.tile_hist + hist
        self.overflow_tokens += int((per_tile > self.slots).any(dim=1).sum())
        self.tokens += M
        if keep is not None and self.union_kept < union_cap:
            rows = active[keep.to(active.device)][: union_cap - self.union_kept].cpu()
            self.union_sample.append(rows)
            self.union_kept += rows.shape[0]

    def summary(self, hot: float, seed: int = 0) -> dict:
        counts = torch.cat(self.per_token).float() if self.per_token else torch.zeros(0)
        q = lambda p: float(torch.quantile(counts, p)) if counts.numel() else float("nan")
        uc = self.unit_counts if self.unit_counts is not None else torch.zeros(self.N, dtype=torch.int64)
        rate = uc.double() / max(self.tokens, 1)
        hist = self.tile_hist if self.tile_hist is not None else torch.zeros(self.tile + 1, dtype=torch.int64)
        n_tiles = int(hist.sum())
        cum = torch.cumsum(hist, 0).double() / max(n_tiles, 1)
        tile_p99 = int(torch.searchsorted(cum, torch.tensor(0.99, dtype=torch.float64)))
        occupied = torch.nonzero(hist).flatten()
        mean_active = float(counts.mean()) if counts.numel() else float("nan")
        out = {
            "name": self.name,
            "N": self.N,
            "tokens": self.tokens,
            "active_mean": mean_active,
            "active_p50": q(0.5),
            "active_p99": q(0.99),
            "active_max": float(counts.max()) if counts.numel() else float("nan"),
            "density": mean_active / self.N,
            "dead_units": int((uc == 0).sum()),
            "dead_fraction": float((uc == 0).double().mean()),
            "hot_units": int((rate > hot).sum()),
            "hot_fraction": float((rate > hot).double().mean()),
            "tile": self.tile,
            "slots": self.slots,
            "tile_occupancy_mean": float(
                (hist.double() * torch.arange(self.tile + 1)).sum() / max(n_tiles, 1)
            ),
            "tile_occupancy_p99": tile_p99,
            "tile_occupancy_max": int(occupied.max()) if occupied.numel() else 0,
            "tile_overflow_fraction": float(hist[self.slots + 1 :].sum()) / max(n_tiles, 1),
            "overflow_token_fraction": self.overflow_tokens / max(self.tokens, 1),
            "tile_hist": hist.tolist(),
            "unit_rate_sorted": sorted(rate.tolist(), reverse=True),
        }
        out["union_curve"] = self.union_curve(mean_active / self.N if self.N else 0.0, seed)
        if self.twell_tokens:
            out["twell_l0"] = self.twell_l0_sum / self.twell_tokens
        return out

    def union_curve(self, rho: float, seed: int = 0, repeats: int = 8) -> list[dict]:
        """u(M) for M = 1, 2, 4, ... up to the sampled tokens: mean over ``repeats`` random draws."""
        if not self.union_sample:
            return []
        masks = torch.cat(self.union_sample)
        T = masks.shape[0]
        g = torch.Generator().manual_seed(seed)
        curve = []
        M = 1
        while M <= T:
            us = []
            for _ in range(repeats if M < T else 1):
                idx = torch.randperm(T, generator=g)[:M]
                us.append(float(masks[idx].any(0).float().mean()))
            u = sum(us) / len(us)
            curve.append(
                {"M": M, "u": u, "u_iid": 1.0 - (1.0 - rho) ** M, "decode_bound": 3.0 / (1.0 + 2.0 * u)}
            )
            M *= 2
        return curve


@torch.no_grad()
def collect_stats(
    model,
    input_ids: torch.Tensor,
    *,
    batch: int = 4,
    tile: int = 256,
    slots: int = 32,
    union_tokens: int = 2048,
    seed: int = 0,
) -> list[LayerStats]:
    """Runs ``model`` over ``input_ids [B, S]`` in chunks of ``batch`` sequences and accumulates
    :class:`LayerStats` per gated MLP (captured with a forward pre-hook on the MLP, so it works for
    Hugging Face MLPs and :class:`twell.SparseGatedMLP` alike)."""
    from .capture import capture_mlp_inputs, gated_mlps

    mlps = gated_mlps(model)
    layers = [LayerStats(name, m.gate_proj.weight.shape[0], tile, slots) for name, m in mlps]
    total = input_ids.numel()
    p_keep = min(1.0, union_tokens / max(total, 1))
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    state: dict[str, torch.Tensor | None] = {"keep": None}

    def on_input(i, name, x2d, mod):
        active = F.linear(x2d, mod.gate_proj.weight) > 0
        layers[i].add(active, state["keep"], union_tokens)

    with capture_mlp_inputs(model, on_input):
        for s in range(0, input_ids.shape[0], batch):
            ids = input_ids[s : s + batch].to(device)
            state["keep"] = torch.rand(ids.numel(), generator=g) < p_keep
            model(input_ids=ids, use_cache=False)
            for L, (_, m) in zip(layers, mlps):
                st = getattr(m, "last_stats", None)
                if st is not None and hasattr(m, "l1_coeff"):
                    L.twell_l0_sum += float(st.l0) * ids.numel()
                    L.twell_tokens += ids.numel()
    return layers


def _plots(summaries: list[dict], out: Path, title: str) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []

    def save(fig, name):
        FigureCanvasAgg(fig)
        fig.tight_layout()
        p = out / name
        fig.savefig(p, dpi=110)
        paths.append(p)

    idx = list(range(len(summaries)))
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(111)
    for key, style in (
        ("active_mean", "o-"),
        ("active_p50", "s--"),
        ("active_p99", "^-"),
        ("active_max", "v:"),
    ):
        ax.plot(idx, [s[key] for s in summaries], style, label=key.replace("active_", ""))
    ax.set_xlabel("layer")
    ax.set_ylabel("active units per token")
    ax.set_yscale("log")
    ax.set_title(f"{title}: active units per token", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "active_per_token.png")

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(111)
    for i, s in enumerate(summaries):
        r = s["unit_rate_sorted"]
        ax.plot(
            range(len(r)),
            [max(v, 1e-7) for v in r],
            color=f"C{i % 10}",
            lw=1,
            label=f"L{i}" if i < 10 else None,
        )
    ax.set_yscale("log")
    ax.set_xlabel("unit rank (most active first)")
    ax.set_ylabel("firing rate (floored at 1e-7: dead)")
    ax.set_title(f"{title}: unit firing rates (dead and hot units)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    save(fig, "unit_rates.png")

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(111)
    for i, s in enumerate(summaries):
        h = s["tile_hist"]
        tot = max(sum(h), 1)
        xs = [k for k, v in enumerate(h) if v]
        ax.plot(xs, [h[k] / tot for k in xs], color=f"C{i % 10}", lw=1, label=f"L{i}" if i < 10 else None)
    slots = summaries[0]["slots"] if summaries else 32
    ax.axvline(slots, color="r", ls="--", label=f"slots S={slots}")
    ax.set_yscale("log")
    ax.set_xlabel(f"active units in a (token, tile of {summaries[0]['tile'] if summaries else 256})")
    ax.set_ylabel("fraction of (token, tile)s")
    ax.set_title(f"{title}: tile occupancy vs slot capacity", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    save(fig, "tile_occupancy.png")

    fig = Figure(figsize=(10, 4.5))
    ax = fig.add_subplot(121)
    bx = fig.add_subplot(122)
    for i, s in enumerate(summaries):
        c = s["union_curve"]
        if not c:
            continue
        Ms = [p["M"] for p in c]
        ax.plot(Ms, [p["u"] for p in c], "o-", color=f"C{i % 10}", ms=3, label=f"L{i}" if i < 10 else None)
        ax.plot(Ms, [p["u_iid"] for p in c], ":", color=f"C{i % 10}", lw=0.8)
        bx.plot(Ms, [p["decode_bound"] for p in c], "o-", color=f"C{i % 10}", ms=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens in the batch)")
    ax.set_ylabel("union density u(M) (dotted: independent tokens)")
    ax.set_title(f"{title}: batch-union density", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    bx.set_xscale("log", base=2)
    bx.set_xlabel("M (decode batch)")
    bx.set_ylabel("FFN decode speedup bound 3 / (1 + 2u)")
    bx.grid(alpha=0.3)
    save(fig, "union_density.png")
    return paths


def write_report(summaries: list[dict], out: Path, *, meta: dict, plots: bool = True, console=None) -> dict:
    """Writes ``report.txt``, ``stats.json`` and (unless ``plots=False``) PNGs into ``out``;
    prints the per-layer table on ``console``. Returns ``{"text", "json", "plots"}`` paths."""
    from rich.console import Console
    from rich.table import Table

    out.mkdir(parents=True, exist_ok=True)
    t = Table(
        title=f"twell stats: {meta['model']} over {meta['tokens']} tokens ({meta['device']})",
        caption=f"tile T={meta['tile']}, slots S={meta['slots']}; hot: firing rate > {meta['hot']}",
    )
    cols = [
        "layer",
        "N",
        "act mean",
        "p50",
        "p99",
        "max",
        "density",
        "dead",
        "hot",
        "tile p99/max",
        "ovf tok %",
        "u(8)",
        "u(64)",
    ]
    has_twell = any("twell_l0" in s for s in summaries)
    if has_twell:
        cols.append("twell l0")
    for c in cols:
        t.add_column(c, justify="left" if c == "layer" else "right")
    lines = []
    for i, s in enumerate(summaries):
        u = {p["M"]: p["u"] for p in s["union_curve"]}
        cells = [
            f"{i} {s['name']}",
            str(s["N"]),
            f"{s['active_mean']:.1f}",
            f"{s['active_p50']:.0f}",
            f"{s['active_p99']:.0f}",
            f"{s['active_max']:.0f}",
            f"{100 * s['density']:.2f}%",
            f"{s['dead_units']} ({100 * s['dead_fraction']:.1f}%)",
            f"{s['hot_units']}",
            f"{s['tile_occupancy_p99']}/{s['tile_occupancy_max']}",
            f"{100 * s['overflow_token_fraction']:.2f}",
            f"{u[8]:.3f}" if 8 in u else "-",
            f"{u[64]:.3f}" if 64 in u else "-",
        ]
        if has_twell:
            cells.append(f"{s['twell_l0']:.1f}" if "twell_l0" in s else "-")
        t.add_row(*cells)
        lines.append("\t".join(cells))
    console = console or Console()
    console.print(t)
    txt = out / "report.txt"
    with txt.open("w") as fh:
        fh.write(f"twell stats: {json.dumps(meta)}\n")
        fh.write("\t".join(cols) + "\n")
        fh.write("\n".join(lines) + "\n\n")
        for i, s in enumerate(summaries):
            fh.write(
                f"layer {i} ({s['name']}) u(M): "
                + ", ".join(
                    f"M={p['M']}: {p['u']:.4f} (iid {p['u_iid']:.4f}, decode bound {p['decode_bound']:.2f}x)"
                    for p in s["union_curve"]
                )
                + "\n"
            )
    js = out / "stats.json"
    js.write_text(json.dumps({"meta": meta, "layers": summaries}, default=_nan_none))
    pngs = _plots(summaries, out, meta["model"]) if plots and summaries else []
    return {"text": txt, "json": js, "plots": pngs}


def _nan_none(o):
    return None if isinstance(o, float) and math.isnan(o) else str(o)


def _maybe_sparsify(model, mode: str, console) -> bool:
    """Swaps in twell's sparse MLPs per ``mode``; returns whether the model now runs them."""
    from twell.nn import SparseGatedMLP

    if any(isinstance(m, SparseGatedMLP) for m in model.modules()):
        return True
    act = str(getattr(model.config, "hidden_act", "?"))
    if act != "relu":
        console.print(
            f"[yellow]model activation is {act!r}: active units are counted as gate > 0, the set "
            "a ReLU model keeps (statistics of a ReLUfied copy before fine-tuning)[/yellow]"
        )
    if mode == "no" or (mode == "auto" and act != "relu"):
        return False
    import twell

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the activation warning was printed above
        twell.sparsify_(model, twell.SparsityConfig(force_relu=True))
    return True


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .capture import load_model, load_tokenizer, read_texts, token_blocks
    from .env import resolve_device, resolve_dtype

    console = Console()
    try:
        if args.batch < 1 or args.seq_len < 1 or args.max_tokens < 1 or args.union_tokens < 1:
            raise ValueError("batch/seq-len/max-tokens/union-tokens: must be >= 1")
        if not 0 < args.hot <= 1:
            raise ValueError(f"hot: must be in (0, 1], got {args.hot}")
        from .._checks import check_tile_slots

        check_tile_slots(args.tile, args.slots)
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        tok = load_tokenizer(args.tokenizer or args.model)
        ids = token_blocks(tok, read_texts(args.data), args.seq_len, args.max_tokens)
        model = load_model(args.model, device, dtype)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    sparse = _maybe_sparsify(model, args.sparsify, console)
    layers = collect_stats(
        model,
        ids,
        batch=args.batch,
        tile=args.tile,
        slots=args.slots,
        union_tokens=args.union_tokens,
        seed=args.seed,
    )
    summaries = [L.summary(args.hot, args.seed) for L in layers]
    name = Path(args.model).resolve().name
    out = Path(args.out) if args.out else Path(f"twell-stats-{name}")
    meta = {
        "model": name,
        "tokens": int(ids.numel()),
        "sequences": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "tile": args.tile,
        "slots": args.slots,
        "hot": args.hot,
        "twell_sparse_mlps": sparse,
    }
    res = write_report(summaries, out, meta=meta, plots=not args.no_plots, console=console)
    console.print(f"wrote {res['text']}, {res['json']} and {len(res['plots'])} plots in {out}")
    return 0
