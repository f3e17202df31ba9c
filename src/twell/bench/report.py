"""Benchmark output: the rich table on screen, BENCHMARKS.md tables and PNG plots from JSON lines.

Plots are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, so rendering never
touches pyplot's global state or the user's backend.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["load_rows", "print_table", "render_report", "header_line", "latest_rows"]

_ENV_KEYS = ("gpu", "cuda", "torch", "triton", "commit")


def load_rows(inputs: Iterable[str | Path]) -> list[dict]:
    """Rows from JSON-lines files and directories of ``*.jsonl`` files (blank lines skipped;
    a malformed line raises ``ValueError`` naming the file and line)."""
    files: list[Path] = []
    for p in inputs:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(p.glob("*.jsonl")))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"inputs: {str(p)!r} is neither a file nor a directory")
    rows = []
    for f in files:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"inputs: {f}:{i} is not JSON ({e.msg})") from None
    return rows


def header_line(row: dict) -> str:
    """``GPU | CUDA | torch | triton | commit`` of a row."""
    return " | ".join(f"{k if k != 'gpu' else 'GPU'} {row.get(k, '?')}" for k in _ENV_KEYS)


def _fmt(v, spec: str = ".3f", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if v < 1 else f"{v:.3f}" if v < 100 else f"{v:.1f}"


def print_table(rows: Sequence[dict], console=None, title: str | None = None) -> None:
    """Prints ``rows`` as a rich table headed by ``GPU | CUDA | torch | triton | commit`` and the
    measured roofs. CPU runs say so in the GPU field (``CPU (...)``)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not rows:
        console.print("no rows")
        return
    r0 = rows[0]
    cpu = r0.get("device") == "cpu"
    caption = None
    if "roof_matmul_tflops" in r0:
        caption = (
            f"roofs: matmul {r0['roof_matmul_tflops']:.2f} TFLOP/s, copy {r0['roof_copy_gbps']:.1f} GB/s; "
            "bound = roofline speedup limit (DESIGN 5) at the measured active units and union density"
        )
    if cpu:
        caption = (caption or "") + "\nCPU numbers: twell runs its torch reference path on CPU (no kernels)"
    t = Table(title=title or header_line(r0), caption=caption)
    cols = [
        ("op", "left"),
        ("shape", "left"),
        ("M", "right"),
        ("act/tok", "right"),
        ("pattern", "left"),
        ("provider", "left"),
        ("ms (p20-p80)", "right"),
        ("eager ms", "right"),
        ("tok/ms", "right"),
        ("speedup", "right"),
        ("bound", "right"),
        ("ach/bound", "right"),
        ("u(M)", "right"),
        ("MiB", "right"),
        ("mJ/tok", "right"),
        ("fwd ms (x)", "right"),
    ]
    body = []
    for r in rows:
        sp = r.get("speedup_vs_dense")
        style = None
        if r.get("provider") != "dense" and isinstance(sp, float) and not math.isnan(sp):
            style = "green" if sp >= 1.0 else "red"
        cells = [
            r["op"],
            r["shape"],
            str(r["M"]),
            _fmt(r["active_per_token"], ".1f"),
            r["pattern"],
            r["provider"]
            + ("*" if r.get("twell_path") == "reference" else "")
            + (f" ({r['twell_dispatch']})" if r.get("twell_dispatch") else ""),
            f"{_ms(r['ms'])} ({_ms(r['ms_p20'])}-{_ms(r['ms_p80'])})",
            _ms(r.get("eager_ms")),
            _fmt(r["tokens_per_ms"], ",.0f"),
            _fmt(sp, ".2f"),
            _fmt(r["bound"], ".2f"),
            _fmt(r["achieved_over_bound"], ".2f"),
            _fmt(r.get("union_density"), ".3f"),
            _fmt(r.get("peak_mem_mib"), ",.0f"),
            _fmt(r.get("energy_mj_per_token"), ".4f"),
            # ffn_fwdbwd: the training forward alone and its speedup over dense's
            "-"
            if r.get("fwd_ms") is None
            else f"{_ms(r['fwd_ms'])} ({_fmt(r.get('fwd_speedup_vs_dense'), '.2f')})",
        ]
        body.append((cells, style))
    # columns with no value in any row (eager time and energy on CPU, ...) are left out
    keep = [j for j in range(len(cols)) if any(c[j] != "-" for c, _ in body)]
    for j in keep:
        t.add_column(cols[j][0], justify=cols[j][1])
    for cells, style in body:
        t.add_row(*[cells[j] for j in keep], style=style)
    console.print(t)
    if any(r.get("twell_path") == "reference" for r in rows):
        console.print("* twell ran its torch reference path (no kernel for this device/op in this install)")


def _op(r: dict) -> str:
    """The op a row is reported under: model rows keep their timing variant apart (decode replayed
    as a CUDA graph is another measurement than eager decode)."""
    if r.get("bench") == "model" and r.get("variant"):
        return f"{r.get('op')}-{r['variant']}"
    return r.get("op")


def _key(r: dict) -> tuple:
    return (
        r.get("gpu"),
        r.get("bench"),
        _op(r),
        r.get("shape"),
        r.get("M"),
        r.get("pattern"),
        r.get("target_active", round(r.get("active_per_token", 0.0))),
        r.get("provider"),
        r.get("batch"),
    )


def latest_rows(rows: Iterable[dict]) -> list[dict]:
    """One row per (gpu, bench, op, shape, M, pattern, target active, provider): the latest."""
    best: dict[tuple, dict] = {}
    for r in rows:
        k = _key(r)
        if k not in best or r.get("timestamp", "") >= best[k].get("timestamp", ""):
            best[k] = r
    return list(best.values())


def _groups(rows: Iterable[dict]) -> dict[tuple, list[dict]]:
    g = defaultdict(list)
    for r in rows:
        g[(r.get("gpu"), r.get("bench"), _op(r), r.get("shape"))].append(r)
    return dict(sorted(g.items(), key=lambda kv: tuple(str(x) for x in kv[0])))


def _series_key(r: dict) -> tuple:
    return (r.get("pattern"), r.get("target_active", round(r["active_per_token"])))


def _md_table(rows: list[dict]) -> list[str]:
    """One line per (M, pattern, target active): dense vs each other provider."""
    by = defaultdict(dict)
    for r in rows:
        by[(r["M"], r.get("pattern"), r.get("target_active", r["active_per_token"]))][r["provider"]] = r
    provs = sorted({p for d in by.values() for p in d if p != "dense"})
    head = ["M", "pattern", "act/tok", "u(M)", "dense ms", "dense eager ms"]
    for p in provs:
        head += [f"{p} ms", f"{p} eager ms", "speedup", "bound", "ach/bound"]
    head += ["dense MiB"] + [f"{p} MiB" for p in provs] + ["dense mJ/tok"] + [f"{p} mJ/tok" for p in provs]
    body = []
    for (M, pat, _), d in sorted(by.items(), key=lambda kv: (str(kv[0][1]), float(kv[0][2]), kv[0][0])):
        any_row = next(iter(d.values()))
        dense = d.get("dense")
        cells = [
            str(M),
            str(pat),
            _fmt(any_row["active_per_token"], ".1f"),
            _fmt(any_row.get("union_density"), ".3f"),
        ]
        cells.append(_ms(dense["ms"]) if dense else "-")
        cells.append(_ms(dense.get("eager_ms")) if dense else "-")
        for p in provs:
            r = d.get(p)
            if r is None:
                cells += ["-"] * 5
                continue
            note = "*" if r.get("twell_path") == "reference" else ""
            if r.get("twell_dispatch"):
                note += f" ({r['twell_dispatch']})"
            cells += [
                _ms(r["ms"]) + note,
                _ms(r.get("eager_ms")),
                f"**{_fmt(r['speedup_vs_dense'], '.2f')}**",
                _fmt(r["bound"], ".2f"),
                _fmt(r["achieved_over_bound"], ".2f"),
            ]
        cells.append(_fmt(dense.get("peak_mem_mib") if dense else None, ",.0f"))
        cells += [_fmt(d[p].get("peak_mem_mib") if p in d else None, ",.0f") for p in provs]
        cells.append(_fmt(dense.get("energy_mj_per_token") if dense else None, ".4f"))
        cells += [_fmt(d[p].get("energy_mj_per_token") if p in d else None, ".4f") for p in provs]
        body.append(cells)
    # columns empty in every line (eager time, memory and energy on CPU) are left out
    keep = [j for j in range(len(head)) if any(c[j] != "-" for c in body)]
    out = ["| " + " | ".join(head[j] for j in keep) + " |", "|" + "---|" * len(keep)]
    out += ["| " + " | ".join(c[j] for j in keep) + " |" for c in body]
    return out


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _new_fig(w: float = 7.0, h: float = 4.5):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    return fig, fig.add_subplot(111)


def _plot_speedup_vs_m(rows: list[dict], title: str, path: Path) -> Path | None:
    sparse = [r for r in rows if r["provider"] != "dense"]
    if not sparse:
        return None
    fig, ax = _new_fig()
    series = defaultdict(list)
    for r in sparse:
        series[(r["provider"],) + _series_key(r)].append(r)
    for i, (k, rs) in enumerate(sorted(series.items(), key=lambda kv: str(kv[0]))):
        rs = sorted(rs, key=lambda r: r["M"])
        c = f"C{i % 10}"
        Ms = [r["M"] for r in rs]
        ax.plot(Ms, [r["speedup_vs_dense"] for r in rs], "o-", color=c, label=f"{k[0]} {k[1]} a~{k[2]:g}")
        ax.plot(Ms, [r["bound"] for r in rs], "--", color=c, alpha=0.5)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens per call)")
    ax.set_ylabel("speedup vs dense (dashed: bound)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_speedup_vs_active(rows: list[dict], title: str, path: Path) -> Path | None:
    sparse = [r for r in rows if r["provider"] != "dense"]
    series = defaultdict(list)
    for r in sparse:
        series[(r["provider"], r.get("pattern"), r["M"])].append(r)
    series = {k: v for k, v in series.items() if len(v) >= 2}
    if not series:
        return None
    fig, ax = _new_fig()
    for i, (k, rs) in enumerate(sorted(series.items(), key=lambda kv: (str(kv[0][:2]), kv[0][2]))):
        rs = sorted(rs, key=lambda r: r["active_per_token"])
        ax.plot(
            [r["active_per_token"] for r in rs],
            [r["speedup_vs_dense"] for r in rs],
            "o-",
            color=f"C{i % 10}",
            label=f"{k[0]} {k[1]} M={k[2]}",
        )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("measured active units per token")
    ax.set_ylabel("speedup vs dense")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _cat(r: dict) -> tuple:
    a = r.get("target_active", r["active_per_token"])
    return (r["shape"], r["op"], str(r.get("pattern")), float(a), r["M"])


def _plot_bars(
    rows: list[dict], field: str, ylabel: str, title: str, path: Path, *, largest_m: bool = False
) -> Path | None:
    """Grouped bars of ``field`` per (shape, op, pattern, active, M), one bar per provider. With
    ``largest_m``, only each (shape, op)'s largest M is drawn (memory grows with M; one bar set
    per density stays readable)."""
    have = [r for r in rows if r.get(field) is not None]
    if largest_m:
        top: dict[tuple, int] = {}
        for r in have:
            k = (r["shape"], r["op"])
            top[k] = max(top.get(k, 0), r["M"])
        have = [r for r in have if r["M"] == top[(r["shape"], r["op"])]]
    if not have:
        return None
    cats = sorted({_cat(r) for r in have})[:40]
    provs = sorted({r["provider"] for r in have}, key=lambda p: (p != "dense", p))
    by = {(_cat(r), r["provider"]): r[field] for r in have}
    fig, ax = _new_fig(max(6.0, 0.8 * len(cats) + 2), 4.5)
    width = 0.8 / len(provs)
    for j, p in enumerate(provs):
        vals = [by.get((c, p), 0.0) for c in cats]
        ax.bar([i + j * width for i in range(len(cats))], vals, width, label=p, color=f"C{j}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))])
    ax.set_xticklabels([f"{c[0]}\n{c[1]} M={c[4]}\n{c[2]} a={c[3]:g}" for c in cats], fontsize=6)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def render_report(
    inputs: Sequence[str | Path],
    out_md: str | Path,
    plots_dir: str | Path | None = None,
    *,
    title: str = "twell benchmarks",
) -> dict[str, list[Path]]:
    """Renders ``out_md`` (markdown tables) and PNG plots from the JSON lines in ``inputs``.

    Per (device, bench, op, shape): a table (dense vs each provider: time, eager time, speedup,
    bound, achieved/bound, union density, peak memory, energy per token), a speedup-vs-M plot and
    a speedup-vs-active-units plot; per device: energy and memory bars. When a row key was
    measured several times, the latest row is used. Returns ``{"markdown": [...], "plots": [...]}``.
    """
    rows = latest_rows(load_rows(inputs))
    out_md = Path(out_md)
    plots_dir = Path(plots_dir) if plots_dir is not None else out_md.parent / "benchmarks" / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    if not rows:
        lines.append("No benchmark rows found.")
    lines += [
        "Rows come from `twell bench` (JSON lines, DESIGN section 7). Kernel rows: `ms` is device time (CUDA: "
        "calls queued behind a GPU sleep, weights rotated over 4 layer sets so no call finds its weights in L2; "
        "CPU: wall time), `eager ms` is back-to-back calls from Python. Model rows: ms per forward (prefill, "
        "eager) or per decode step (eager, or replayed as a CUDA graph where the row's variant is "
        "`cuda-graph`); train rows: ms per optimizer step. `bound` is the roofline speedup limit at the "
        "measured roofs, active units and union density u(M) (DESIGN 5), `ach/bound` = speedup / bound. "
        "`*`: twell ran its torch reference path; `(prefill)`/`(decode)`/`(dense)`: the path twell's "
        "dispatcher picked for that call.",
        "",
    ]
    plots: list[Path] = []
    by_gpu = defaultdict(list)
    for r in rows:
        by_gpu[r.get("gpu")].append(r)
    for gpu, grows in sorted(by_gpu.items(), key=lambda kv: str(kv[0])):
        r0 = max(grows, key=lambda r: r.get("timestamp", ""))
        lines += [
            f"## {gpu}",
            "",
            "| GPU | CUDA | torch | triton | commit | latest run |",
            "|---|---|---|---|---|---|",
        ]
        lines.append(
            f"| {gpu} | {r0.get('cuda', '?')} | {r0.get('torch')} | {r0.get('triton')} | "
            f"{r0.get('commit')} | {r0.get('timestamp')} |"
        )
        if "roof_matmul_tflops" in r0:
            lines += [
                "",
                f"Measured roofs: matmul {r0['roof_matmul_tflops']:.3g} TFLOP/s, copy "
                f"{r0['roof_copy_gbps']:.3g} GB/s (read + write).",
            ]
        if r0.get("device") == "cpu":
            lines += [
                "",
                "**CPU numbers**: twell runs its torch reference path on CPU; they show the harness, "
                "not the kernels.",
            ]
        lines.append("")
        for (g, bench, op, shape), rs in _groups(grows).items():
            K, N = rs[0].get("K"), rs[0].get("N")
            lines += [f"### {bench} / {op} / {shape} (K={K}, N={N}, {rs[0].get('dtype')})", ""]
            lines += _md_table(rs)
            stem = f"{_slug(str(g))}-{bench}-{op}-{shape}"
            t = f"{op} {shape} on {g}"
            for p in (
                _plot_speedup_vs_m(rs, t, plots_dir / f"{stem}-speedup-vs-M.png"),
                _plot_speedup_vs_active(rs, t, plots_dir / f"{stem}-speedup-vs-active.png"),
            ):
                if p is not None:
                    plots.append(p)
                    lines += ["", f"![{p.stem}]({_rel(p, out_md.parent)})"]
            lines.append("")
        for field, ylabel, name in (
            ("energy_mj_per_token", "mJ per token (NVML total energy)", "energy"),
            ("peak_mem_mib", "peak memory above baseline (MiB)", "memory"),
        ):
            p = _plot_bars(
                grows,
                field,
                ylabel,
                f"{name} on {gpu}" + (" (largest M of each shape and op)" if name == "memory" else ""),
                plots_dir / f"{_slug(str(gpu))}-{name}.png",
                largest_m=name == "memory",
            )
            if p is not None:
                plots.append(p)
                lines += [f"![{p.stem}]({_rel(p, out_md.parent)})", ""]
    out_md.write_text("\n".join(lines) + "\n")
    return {"markdown": [out_md], "plots": plots}


def _slug(s: str) -> str:
    from .env import slug

    return slug(s)


def _rel(p: Path, base: Path) -> str:
    try:
        return str(p.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(p)
