"""Test helpers shared by the test suite and the benchmarks.

- :func:`assert_close`: dtype-scaled comparison against a float32/float64 reference, optionally
  relative to torch's own error in the same dtype (``baseline``).
- :func:`make_sparse_activations`: activation tensors with a controlled number of active units.
- :func:`make_sparse_ffn`: FFN inputs and weights whose gate has a controlled number of active
  units per token (iid, skewed, heavy tokens), without a bias term.
- :func:`poison_allocations`: makes the package's output allocations NaN/sentinel-filled.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from . import _alloc

__all__ = [
    "EPS",
    "assert_close",
    "rel_error",
    "make_sparse_activations",
    "make_sparse_ffn",
    "poison_allocations",
    "PATTERNS",
]

#: unit roundoff of each dtype (half the machine epsilon)
EPS = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}

PATTERNS = ("iid", "skewed", "heavy")


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| in float64 (0 when both are zero)."""
    a = actual.detach().double()
    e = expected.detach().double()
    denom = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    return err / denom if denom > 0 else err


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    name: str,
    dtype: torch.dtype | None = None,
    baseline: torch.Tensor | None = None,
    factor: float = 8.0,
    reduce: int = 1,
) -> None:
    """Asserts ``actual`` matches the high-precision ``expected`` within a dtype-scaled bound.

    NaN positions must agree exactly (checked first). The error measure is
    ``max|actual - expected| / max|expected|``. The bound is ``factor * eps(dtype) * sqrt(reduce)``
    (``reduce``: the longest sum behind an element, whose rounding error grows like its square root)
    where ``dtype`` defaults to ``actual``'s; when ``baseline`` (torch's own result in the same dtype)
    is given, ``2 * err(baseline)`` is added to the bound.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a_nan = torch.isnan(actual)
    e_nan = torch.isnan(expected)
    if not torch.equal(a_nan, e_nan):
        extra = int((a_nan & ~e_nan).sum())
        missing = int((~a_nan & e_nan).sum())
        raise AssertionError(f"{name}: NaN pattern differs ({extra} unexpected NaN, {missing} missing NaN)")
    keep = ~e_nan
    a = actual[keep]
    e = expected[keep]
    a_inf, e_inf = torch.isinf(a), torch.isinf(e)
    if not torch.equal(a_inf, e_inf) or not torch.equal(a[a_inf], e[e_inf]):
        raise AssertionError(f"{name}: Inf pattern differs")
    a, e = a[~a_inf], e[~e_inf]
    dt = dtype or actual.dtype
    bound = factor * EPS[dt] * math.sqrt(max(reduce, 1))
    if baseline is not None:
        bound += 2.0 * rel_error(baseline[keep][~e_inf], e)
    err = rel_error(a, e)
    if not err <= bound:
        raise AssertionError(f"{name}: relative error {err:.3e} exceeds bound {bound:.3e} ({dt})")


def _generator(seed: int | None) -> torch.Generator:
    # CPU generator whatever the target device: the same seed gives the same data everywhere
    g = torch.Generator(device="cpu")
    g.manual_seed(0 if seed is None else seed)
    return g


def make_sparse_activations(
    M: int,
    N: int,
    active_per_row: float,
    *,
    pattern: str = "iid",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int | None = 0,
) -> torch.Tensor:
    """``[M, N]`` pre-activations: about ``active_per_row`` entries > 0 per row, the rest < 0.

    pattern: ``"iid"`` (each entry active with probability a/N), ``"skewed"`` (30% of units never
    active, 2% hot units active in half the rows, the rest iid to keep the mean), ``"heavy"``
    (iid, plus 1% of rows, at least one, with min(N, 300) active entries).
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern: expected one of {PATTERNS}, got {pattern!r}")
    if not 0 <= active_per_row <= N:
        raise ValueError(f"active_per_row: must be in [0, N={N}], got {active_per_row}")
    g = _generator(seed)
    p = _unit_rates(N, active_per_row, pattern, g)
    act = torch.rand(M, N, generator=g) < p
    if pattern == "heavy" and M > 0:
        heavy = torch.randperm(M, generator=g)[: max(1, M // 100)]
        act[heavy] = torch.rand(len(heavy), N, generator=g) < min(N, 300) / N
    mag = torch.rand(M, N, generator=g) + 0.05
    h = torch.where(act, mag, -mag)
    return h.to(dtype=dtype, device=device)


def _unit_rates(N: int, a: float, pattern: str, g: torch.Generator) -> torch.Tensor:
    """Per-unit activation probability [N] with mean sum ``a``."""
    if pattern != "skewed" or N < 10:
        return torch.full((N,), a / N)
    perm = torch.randperm(N, generator=g)
    n_dead = int(0.3 * N)
    n_hot = max(1, int(0.02 * N))
    p = torch.zeros(N)
    hot = perm[n_dead : n_dead + n_hot]
    rest = perm[n_dead + n_hot :]
    p_hot = min(0.5, a / (2 * n_hot))
    p[hot] = p_hot
    p[rest] = min(1.0, max(0.0, (a - p_hot * n_hot) / max(len(rest), 1)))
    return p


def _normal_quantile(q: torch.Tensor) -> torch.Tensor:
    return math.sqrt(2.0) * torch.erfinv(2.0 * q.double() - 1.0)


def make_sparse_ffn(
    M: int,
    K: int,
    N: int,
    active_per_token: float,
    *,
    pattern: str = "iid",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int | None = 0,
    weight_std: float = 0.02,
    x_const: float = 1.0,
):
    """Inputs ``x [M, K]`` and weights ``w_gate, w_up [N, K]``, ``w_down [K, N]`` such that about
    ``active_per_token`` gate pre-activations per token are > 0.

    Without a bias, the threshold rides on input column 0: ``x[:, 0] = x_const`` and
    ``w_gate[n, 0] = -tau_n / x_const``, where ``tau_n`` is the normal quantile that makes unit
    ``n`` fire with its target rate given the remaining dot product (~N(0, std^2 (K - 1))).
    Patterns as in :func:`make_sparse_activations`; ``"heavy"`` lowers column 0 on 1% of tokens so
    they have ~min(N, 300) active units.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern: expected one of {PATTERNS}, got {pattern!r}")
    if K < 2:
        raise ValueError(f"K: needs at least 2 columns (column 0 carries the threshold), got {K}")
    if not 0 <= active_per_token <= N:
        raise ValueError(f"active_per_token: must be in [0, N={N}], got {active_per_token}")
    g = _generator(seed)
    x = torch.randn(M, K, generator=g)
    w_gate = torch.randn(N, K, generator=g) * weight_std
    w_up = torch.randn(N, K, generator=g) * weight_std
    w_down = torch.randn(K, N, generator=g) * weight_std
    # float64: in float32 1 - 1e-12 rounds to 1 and never-active units would get an infinite threshold
    p = _unit_rates(N, active_per_token, pattern, g).double().clamp(1e-12, 1 - 1e-12)
    sigma = weight_std * math.sqrt(K - 1)
    tau = sigma * _normal_quantile(1.0 - p)
    x[:, 0] = x_const
    w_gate[:, 0] = (-tau / x_const).float()
    if pattern == "heavy" and M > 0:
        heavy = torch.randperm(M, generator=g)[: max(1, M // 100)]
        # tau_h / tau scales every unit's threshold so that ~min(N, 300) fire on heavy tokens
        q = torch.tensor(min(N, 300) / N, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        tau_h = sigma * _normal_quantile(1.0 - q)
        tau_mean = sigma * _normal_quantile(
            torch.tensor(1.0 - active_per_token / N, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        )
        scale = float(tau_h / tau_mean) if float(tau_mean) != 0 else 0.0
        x[heavy, 0] = x_const * scale
    cast = {"dtype": dtype, "device": device}
    return x.to(**cast), w_gate.to(**cast), w_up.to(**cast), w_down.to(**cast)


@contextlib.contextmanager
def poison_allocations() -> Iterator[None]:
    """While active, the package's output allocations (``twell._alloc.empty``) are filled with
    NaN (floats) or a sentinel (integers), so an element a kernel forgot to write shows up."""
    old = _alloc._state["poison"]
    _alloc._state["poison"] = True
    try:
        yield
    finally:
        _alloc._state["poison"] = old
