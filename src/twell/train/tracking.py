"""Run records: the environment header, the JSONL metrics log and the end-of-run plots."""

from __future__ import annotations

import json
import math
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["environment", "MetricsLog", "read_metrics", "plot_run"]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict:
    """Versions, device and git commit: the first record of every run."""
    import accelerate
    import transformers

    import twell

    env = {
        "twell": twell.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


class MetricsLog:
    """Append-only JSONL file, one object per line (``event``: start | resume | train | eval | end).

    Written by the main process only; non-finite floats are stored as ``null``.
    """

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> list[dict]:
        """Drop records of steps after ``step`` (a resumed run rewrites them) and return the kept ones."""
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step] if self.path.exists() else []
        if self.enabled:
            with self.path.open("w") as f:
                for r in kept:
                    f.write(json.dumps(r) + "\n")
        return kept

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


def read_metrics(path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(records: list[dict], out_dir, intermediate_size: int | None = None) -> list[Path]:
    """``loss.png`` (train CE, validation CE, L1 statistic) and ``sparsity.png`` (active units per token
    min/mean/max over layers, dead-unit fraction) from a run's records; returns the files written."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    if not train:
        return []
    steps = [r["step"] for r in train]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["ce"] for r in train], label="train CE", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_ce"] for r in evals], "o-", label="validation CE")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax2 = ax.twinx()
    l1 = [(r["step"], r["l1"]) for r in train if r.get("l1") is not None]
    ax2.plot([x[0] for x in l1], [x[1] for x in l1], color="tab:red", lw=1, label="L1 statistic")
    ax2.set_ylabel("L1 (mean over layers of sum |h| per token)", color="tab:red")
    ax2.set_yscale("log")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    ax.set_title("loss")
    fig.tight_layout()
    written.append(out_dir / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    sp = [r for r in train if r.get("active_mean") is not None]
    ax.plot(
        [r["step"] for r in sp], [r["active_mean"] for r in sp], label="active units/token (mean over layers)"
    )
    ax.fill_between(
        [r["step"] for r in sp],
        [r["active_min"] for r in sp],
        [r["active_max"] for r in sp],
        alpha=0.25,
        label="min..max layer",
    )
    ev = [r for r in evals if r.get("val_active") is not None]
    if ev:
        ax.plot([r["step"] for r in ev], [r["val_active"] for r in ev], "o", label="validation")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    title = "active FFN units per token"
    if intermediate_size:
        title += f" (of {intermediate_size})"
    ax.set_ylabel("active units per token")
    dead = [(r["step"], r["dead_frac"]) for r in train if r.get("dead_frac") is not None]
    if dead:
        ax2 = ax.twinx()
        ax2.plot(
            [d[0] for d in dead], [100 * d[1] for d in dead], color="tab:gray", ls="--", label="dead units %"
        )
        ax2.set_ylabel("dead units (%)")
        ax2.set_ylim(0, 100)
        ax2.legend(loc="lower left")
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    written.append(out_dir / "sparsity.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written
