"""``twell bench``: one benchmark registry, one runner, one output.

- :mod:`twell.bench.registry`: named shapes (paper 0.5B-2B, llama3-8b, qwen2-0.5b, tiny) and presets.
- :mod:`twell.bench.roofline`: measured roofs and the speedup bounds of DESIGN section 5.
- :mod:`twell.bench.timing`, :mod:`twell.bench.energy`: device time (queued behind a GPU sleep),
  eager time, CUDA graphs, peak memory, NVML energy.
- :mod:`twell.bench.runner`: kernel rows; :mod:`twell.bench.models`: model prefill/decode and
  training-step rows; :mod:`twell.bench.report`: tables, BENCHMARKS.md and plots.

Python API::

    rows = twell.bench.run_kernels("tiny", target_ms=50)
    twell.bench.print_table(rows)
"""

from __future__ import annotations

from .registry import PRESETS, SHAPES, Case, Shape, get_preset, get_shape
from .report import print_table, render_report
from .runner import REQUIRED_FIELDS, BenchOptions, check_row, dense_ffn, run_cases, run_kernels

__all__ = [
    "PRESETS",
    "REQUIRED_FIELDS",
    "SHAPES",
    "BenchOptions",
    "Case",
    "Shape",
    "check_row",
    "dense_ffn",
    "get_preset",
    "get_shape",
    "print_table",
    "render_report",
    "run_cases",
    "run_kernels",
]
