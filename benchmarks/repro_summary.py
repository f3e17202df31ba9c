"""Summary of the dense-vs-sparse reproduction (docs/training.md): one markdown table and one JSON row per run.

Usage: ``python benchmarks/repro_summary.py DENSE_DIR SPARSE_DIR [--json rows.jsonl] [--plot compare.png]``

Each ``*_DIR`` is a ``twell train`` output folder (its ``metrics.jsonl``, or ``metrics.jsonl.gz``;
``run.json`` when ``benchmarks/repro_train.sh`` wrote one: exit code, wall time, time limit), or a
metrics file itself, plain or gzipped, such as the committed
``benchmarks/results/repro-h100/dense-metrics.jsonl.gz`` (no ``run.json``: wall time is then ``-``). A run cut short by its time
limit still has its records up to there: the row then says ``finished: false`` and takes the last
evaluation it reached.

Per run: final validation CE and perplexity (the last ``eval`` record) and the CE ratio sparse/dense
(both taken at their last evaluation; the row says each one's step; and at the last step both runs
evaluated, which differs when a time limit cut a run short), active units per token on the
validation tokens (mean over layers, and the least/most active layer), % zeros in the FFN hidden,
dead units (never active over the last training window of ``dead_window_tokens``: ``dead_frac``; a
dense-MLP run has none, its MLPs are only measured at evaluation), units never active on the
validation tokens, steady-state tokens/s (median over steps after the first 10% and at least 5),
peak memory (GPU: ``max_memory_allocated``; CPU: peak RSS), tokens seen, steps, training time (sum of
step times, evaluation excluded) and wall time (``run.json``: the whole command, data and evaluation
included).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import sys
from pathlib import Path

__all__ = ["metrics_path", "read_records", "summarize_run", "summarize", "markdown_table", "main"]


def metrics_path(run_dir: Path) -> Path:
    """The metrics file of ``run_dir``: the path itself when it is a file, else ``run_dir/metrics.jsonl``
    or, failing that, ``run_dir/metrics.jsonl.gz``."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    for name in ("metrics.jsonl", "metrics.jsonl.gz"):
        if (run_dir / name).is_file():
            return run_dir / name
    raise FileNotFoundError(f"run_dir: no metrics.jsonl (or metrics.jsonl.gz) in {run_dir}")


def read_records(run_dir: Path) -> list[dict]:
    """The records of :func:`metrics_path` (``.gz``: gzip); a last line cut mid-write (run killed) is skipped."""
    path = metrics_path(run_dir)
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
    else:
        text = path.read_text(encoding="utf-8")
    records = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:  # only the last line may be partial; anything else is corruption
                raise ValueError(f"run_dir: {path}:{i + 1} is not JSON") from None
    return records


def _steady_tokens_per_s(train: list[dict]) -> float | None:
    # The first steps carry the Triton compilation and the allocator's warm-up (CPU tiny runs: the
    # first step took 3-5x the median), so they are left out of the steady state.
    if not train:
        return None
    skip = max(5, len(train) // 10)
    rest = train[skip:] or train[-1:]
    return statistics.median(r["tokens_per_s"] for r in rest)


def summarize_run(run_dir: Path, name: str | None = None) -> dict:
    """One row (a flat dict of numbers and strings, ``None`` where the run has no such value) for ``run_dir``."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    start = next((r for r in records if r.get("event") == "start"), None)
    if start is None:
        raise ValueError(f"run_dir: {run_dir}/metrics.jsonl has no start record")
    cfg = start.get("config", {})
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval" and r.get("val_ce") is not None]
    end = next((r for r in records if r.get("event") == "end"), None)
    meta = {}
    if run_dir.is_dir() and (run_dir / "run.json").is_file():
        meta = json.loads((run_dir / "run.json").read_text())
    n_units = cfg.get("intermediate_size")
    last_eval = evals[-1] if evals else None
    last_train = train[-1] if train else None
    per_layer = (last_eval or {}).get("val_active_per_layer") or []
    dead = next((r["dead_frac"] for r in reversed(train) if r.get("dead_frac") is not None), None)
    mems = [r["peak_mem_mib"] for r in train if r.get("peak_mem_mib") is not None]
    val_active = None if last_eval is None else last_eval.get("val_active")
    row = {
        "run": name or run_dir.name,
        "kind": "dense" if cfg.get("l1_coeff", 0) == 0 else "sparse",
        "l1_coeff": cfg.get("l1_coeff"),
        "sparse_mlp": cfg.get("sparse_mlp"),
        "params": start.get("params"),
        "intermediate_size": n_units,
        "device": (start.get("env") or {}).get("gpu") or "cpu",
        "precision": start.get("precision"),
        "finished": end is not None,
        "exit_code": meta.get("exit_code"),
        "steps": last_train["step"] if last_train else 0,
        "max_steps": cfg.get("max_steps"),
        "tokens": last_train["tokens"] if last_train else 0,
        "eval_step": None if last_eval is None else last_eval["step"],
        "val_ce": None if last_eval is None else last_eval["val_ce"],
        "val_ppl": None if last_eval is None else last_eval["val_ppl"],
        "active_mean": val_active,
        "active_min_layer": min(per_layer) if per_layer else None,
        "active_max_layer": max(per_layer) if per_layer else None,
        "zeros_pct": None if val_active is None or not n_units else 100.0 * (1.0 - val_active / n_units),
        "dead_frac": dead,
        "never_active_val": None if last_eval is None else last_eval.get("val_never_active"),
        "train_active_mean": None if last_train is None else last_train.get("active_mean"),
        "tokens_per_s": _steady_tokens_per_s(train),
        "peak_mem_mib": max(mems) if mems else None,
        "train_time_s": sum(r["step_time_s"] for r in train) if train else 0.0,
        "wall_s": meta.get("wall_s"),
    }
    return row


def summarize(dense_dir: Path, sparse_dir: Path) -> list[dict]:
    """Rows of the dense and the sparse run; the sparse row gets ``ce_ratio`` = its val CE / dense val CE."""
    dense = summarize_run(dense_dir, "dense")
    sparse = summarize_run(sparse_dir, "sparse")
    ratio = None
    if dense["val_ce"] and sparse["val_ce"] is not None:
        ratio = sparse["val_ce"] / dense["val_ce"]
    dense["ce_ratio"] = 1.0 if dense["val_ce"] else None
    sparse["ce_ratio"] = ratio
    # Runs cut short by their time limits stop at different steps, and an earlier step has a higher
    # learning rate (the cosine runs over max_steps): compare also at the last step both evaluated.
    ce = [
        {
            r["step"]: r["val_ce"]
            for r in read_records(d)
            if r.get("event") == "eval" and r.get("val_ce") is not None
        }
        for d in (dense_dir, sparse_dir)
    ]
    common = sorted(set(ce[0]) & set(ce[1]))
    for row in (dense, sparse):
        row["common_step"] = common[-1] if common else None
    dense["ce_ratio_common"] = 1.0 if common else None
    sparse["ce_ratio_common"] = ce[1][common[-1]] / ce[0][common[-1]] if common else None
    return [dense, sparse]


def _fmt(v, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


#: (column header, row key, format) of the markdown table
_COLUMNS = [
    ("run", "run", ""),
    ("finished", "finished", ""),
    ("steps", "steps", ""),
    ("tokens (M)", "tokens_m", ".1f"),
    ("val CE (at step)", "val_ce_at", ""),
    ("val ppl", "val_ppl", ".2f"),
    ("CE ratio", "ce_ratio", ".4f"),
    ("CE ratio (same step)", "ratio_common", ""),
    ("active/token mean [min..max layer]", "active", ""),
    ("% zeros", "zeros_pct", ".2f"),
    ("dead (train window)", "dead_pct", ""),
    ("never active (val)", "never_pct", ""),
    ("tokens/s", "tokens_per_s", ",.0f"),
    ("peak mem (MiB)", "peak_mem_mib", ",.0f"),
    ("train s", "train_time_s", ".1f"),
    ("wall s", "wall_s", ".1f"),
]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def markdown_table(rows: list[dict]) -> str:
    """The rows of :func:`summarize` as one markdown table."""
    lines = [
        "| " + " | ".join(h for h, _, _ in _COLUMNS) + " |",
        "|" + "|".join("---" for _ in _COLUMNS) + "|",
    ]
    for r in rows:
        view = dict(r)
        view["tokens_m"] = r["tokens"] / 1e6
        view["val_ce_at"] = "-" if r["val_ce"] is None else f"{r['val_ce']:.4f} ({r['eval_step']})"
        view["active"] = (
            "-"
            if r["active_mean"] is None
            else f"{r['active_mean']:.1f} [{r['active_min_layer']:.1f}..{r['active_max_layer']:.1f}]"
        )
        view["ratio_common"] = (
            "-" if r.get("ce_ratio_common") is None else f"{r['ce_ratio_common']:.4f} ({r['common_step']})"
        )
        view["dead_pct"] = _pct(r["dead_frac"])
        view["never_pct"] = _pct(r["never_active_val"])
        cells = [_fmt(view.get(key), spec) if spec else _fmt(view.get(key)) for _, key, spec in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(dense_dir: Path, sparse_dir: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for name, d in (("dense", dense_dir), ("sparse", sparse_dir)):
        recs = read_records(d)
        ev = [r for r in recs if r.get("event") == "eval" and r.get("val_ce") is not None]
        ax.plot([r["tokens"] / 1e6 for r in ev], [r["val_ce"] for r in ev], "o-", label=name)
        bx.plot([r["tokens"] / 1e6 for r in ev], [r["val_active"] for r in ev], "o-", label=name)
    ax.set_xlabel("tokens seen (M)")
    ax.set_ylabel("validation CE (nats/token)")
    ax.legend()
    bx.set_xlabel("tokens seen (M)")
    bx.set_ylabel("active units/token (validation, layer mean)")
    bx.set_yscale("log")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("dense_dir", type=Path, help="output dir (or metrics.jsonl[.gz]) of the dense run (L1 0)")
    p.add_argument("sparse_dir", type=Path, help="output dir (or metrics.jsonl[.gz]) of the sparse run")
    p.add_argument("--json", type=Path, default=None, help="also append the JSON rows to this file")
    p.add_argument("--plot", type=Path, default=None, help="write a dense-vs-sparse validation plot (PNG)")
    args = p.parse_args(argv)
    try:
        rows = summarize(args.dense_dir, args.sparse_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(rows))
    print()
    for r in rows:
        print(json.dumps(r))
    if args.json is not None:
        with args.json.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if args.plot is not None:
        _plot(args.dense_dir, args.sparse_dir, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
