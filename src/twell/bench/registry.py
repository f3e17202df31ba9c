"""Named model shapes and benchmark presets: the one registry every ``twell bench`` mode reads.

Legend: K = model dim, N = FFN units, M = tokens in one call, a = active units per token.

A :class:`Shape` is a model's FFN (and, for the model/train modes, its decoder) geometry; a
:class:`Case` is a sweep (shape x M x active units x patterns x ops); a preset is a tuple of cases.
The CLI maps ``--preset``/``--shape``/``--M``/``--active`` onto these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

__all__ = [
    "Shape",
    "Case",
    "SHAPES",
    "PRESETS",
    "KERNEL_OPS",
    "MODEL_OPS",
    "TRAIN_OPS",
    "PROVIDERS",
    "get_shape",
    "get_preset",
]

#: kernel-level ops (DESIGN 7 names) and what they time
KERNEL_OPS = ("ffn_fwd", "ffn_fwdbwd")
#: model-level ops
MODEL_OPS = ("prefill", "decode")
#: training ops
TRAIN_OPS = ("train_step",)
#: providers: dense torch (cuBLAS on CUDA), twell.sparse_ffn, and a user-supplied callable
PROVIDERS = ("dense", "twell", "reference")


@dataclass(frozen=True)
class Shape:
    """A model geometry.

    Attributes:
        name: registry key (e.g. ``"paper-1b"``); rows carry it in ``shape``.
        K: model dim (hidden size). N: FFN units (intermediate size).
        layers, heads, kv_heads, vocab: decoder geometry for the model and train modes.
    """

    name: str
    K: int
    N: int
    layers: int = 1
    heads: int = 1
    kv_heads: int | None = None
    vocab: int = 32000

    def __post_init__(self):
        for f in ("K", "N", "layers", "heads", "vocab"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f}: expected a positive int, got {v!r}")
        if self.K % self.heads:
            raise ValueError(f"heads: K={self.K} must be a multiple of heads={self.heads}")


# The paper's SparseLM family: hidden 2048, FFN 5632, 32 heads, vocab 49152, 8/18/28/38 layers.
_PAPER = {"paper-0.5b": 8, "paper-1b": 18, "paper-1.5b": 28, "paper-2b": 38}

SHAPES: dict[str, Shape] = {
    **{n: Shape(n, 2048, 5632, layers=L, heads=32, vocab=49152) for n, L in _PAPER.items()},
    # kernel-level alias of the paper FFN (the name DESIGN 7 uses)
    "paper-2048x5632": Shape("paper-2048x5632", 2048, 5632, layers=8, heads=32, vocab=49152),
    "paper-2048x8192": Shape("paper-2048x8192", 2048, 8192, layers=8, heads=32, vocab=49152),
    "llama3-8b": Shape("llama3-8b", 4096, 14336, layers=32, heads=32, kv_heads=8, vocab=128256),
    "qwen2-0.5b": Shape("qwen2-0.5b", 896, 4864, layers=24, heads=14, kv_heads=2, vocab=151936),
    # small enough for the CPU (reference path) in a few seconds
    "tiny": Shape("tiny", 128, 512, layers=2, heads=4, vocab=512),
}


def get_shape(name: str) -> Shape:
    """The registered :class:`Shape` ``name``, or a ``KxN`` spec such as ``"1024x4096"``."""
    if name in SHAPES:
        return SHAPES[name]
    parts = name.lower().split("x")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        K, N = int(parts[0]), int(parts[1])
        heads = next(h for h in (32, 16, 8, 4, 2, 1) if K % h == 0)
        return Shape(name, K, N, heads=heads)
    raise ValueError(f"shape: {name!r} is not registered (known: {sorted(SHAPES)}) nor of the form KxN")


@dataclass(frozen=True)
class Case:
    """One sweep of a preset: every combination of ``Ms x actives x patterns x ops x providers``.

    ``actives`` are target active units per token (the measured count is what rows report);
    patterns are those of :func:`twell.testing.make_sparse_ffn` (``iid``, ``skewed``, ``heavy``).
    """

    shape: str
    Ms: tuple[int, ...]
    actives: tuple[float, ...]
    patterns: tuple[str, ...] = ("iid",)
    ops: tuple[str, ...] = ("ffn_fwd",)
    providers: tuple[str, ...] = ("dense", "twell")
    # extra knobs of the model/train modes: sequences per batch, tokens per sequence, new tokens
    batch: int = 1
    seq: int = 128
    new_tokens: int = 16

    def __post_init__(self):
        get_shape(self.shape)
        if not self.Ms or any((not isinstance(m, int)) or m < 1 or m > 1 << 18 for m in self.Ms):
            raise ValueError(f"Ms: expected token counts in [1, 262144], got {self.Ms!r}")
        if not self.actives or any(a < 0 for a in self.actives):
            raise ValueError(f"actives: expected non-negative active unit counts, got {self.actives!r}")
        from ..testing import PATTERNS

        bad = [p for p in self.patterns if p not in PATTERNS]
        if bad:
            raise ValueError(f"patterns: {bad} not in {PATTERNS}")
        known = KERNEL_OPS + MODEL_OPS + TRAIN_OPS
        bad = [o for o in self.ops if o not in known]
        if bad:
            raise ValueError(f"ops: {bad} not in {known}")
        bad = [p for p in self.providers if p not in PROVIDERS]
        if bad:
            raise ValueError(f"providers: {bad} not in {PROVIDERS}")

    def with_(self, **kw) -> Case:
        return replace(self, **kw)


_H100_M = (1, 8, 64, 256, 2048, 16384, 131072)


@dataclass(frozen=True)
class Preset:
    """A named list of cases plus the mode it belongs to (``kernels``, ``model`` or ``train``)."""

    name: str
    mode: str
    cases: tuple[Case, ...] = field(default_factory=tuple)
    doc: str = ""
    #: default --time-budget of the preset (s): rows not started by then are skipped
    time_budget_s: float | None = None


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "tiny",
            "kernels",
            (
                Case("tiny", (1, 16, 256), (8.0, 32.0), ("iid",), ("ffn_fwd", "ffn_fwdbwd")),
                Case("tiny", (64,), (8.0,), ("skewed", "heavy"), ("ffn_fwd",)),
            ),
            "CPU-sized smoke run (seconds): the reference path on CPU, kernels on CUDA",
        ),
        Preset(
            "h100",
            "kernels",
            (
                Case("paper-2048x5632", _H100_M, (24.0, 39.0, 100.0, 900.0), ("iid",), ("ffn_fwd",)),
                Case("paper-2048x5632", _H100_M, (30.0,), ("skewed",), ("ffn_fwd",)),
                Case("paper-2048x5632", (2048, 16384), (30.0,), ("iid",), ("ffn_fwdbwd",)),
                Case("llama3-8b", (1, 64, 2048, 16384), (30.0, 100.0), ("iid",), ("ffn_fwd",)),
            ),
            "issue 4/8 sweep on one H100 (about 3-4 minutes): paper FFN across M and density, llama3-8b",
            time_budget_s=230.0,
        ),
        Preset(
            "paper",
            "kernels",
            tuple(
                Case(s, _H100_M, (24.0, 39.0, 100.0, 900.0), ("iid", "skewed", "heavy"), KERNEL_OPS)
                for s in ("paper-2048x5632", "paper-2048x8192")
            ),
            "every paper FFN shape, density and pattern, forward and forward+backward (long)",
        ),
        Preset(
            "shapes",
            "kernels",
            tuple(
                Case(s, (1, 64, 2048, 16384), (30.0,), ("iid",), ("ffn_fwd",))
                for s in ("paper-2048x5632", "paper-2048x8192", "llama3-8b", "qwen2-0.5b")
            ),
            "one density across every registered FFN shape",
        ),
        Preset(
            "model-tiny",
            "model",
            (
                Case(
                    "tiny",
                    (32,),
                    (8.0,),
                    ("iid",),
                    MODEL_OPS,
                    ("dense", "twell"),
                    batch=2,
                    seq=16,
                    new_tokens=2,
                ),
            ),
            "whole-model prefill/decode on a tiny random Llama (CPU seconds)",
        ),
        Preset(
            "model-h100",
            "model",
            tuple(
                Case(
                    s,
                    (2048,),
                    (30.0,),
                    ("iid",),
                    MODEL_OPS,
                    ("dense", "twell"),
                    batch=b,
                    seq=2048,
                    new_tokens=32,
                )
                for s in ("paper-0.5b", "paper-2b")
                for b in (1, 8, 16)
            ),
            "prefill/decode of the paper 0.5B and 2B shapes, batch 1, 8 and 16, 2k context",
        ),
        Preset(
            "train-tiny",
            "train",
            (Case("tiny", (32,), (8.0,), ("iid",), TRAIN_OPS, ("dense", "twell"), batch=2, seq=16),),
            "one training step of a tiny random Llama (CPU seconds)",
        ),
        Preset(
            "train-h100",
            "train",
            (
                Case(
                    "paper-0.5b",
                    (16384,),
                    (30.0,),
                    ("iid",),
                    TRAIN_OPS,
                    ("dense", "twell"),
                    batch=8,
                    seq=2048,
                ),
            ),
            "a training step (fwd + bwd + AdamW) of the paper 0.5B shape, 8 x 2048 tokens",
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The registered :class:`Preset` ``name``."""
    if name not in PRESETS:
        raise ValueError(f"preset: {name!r} is not registered (known: {sorted(PRESETS)})")
    return PRESETS[name]
