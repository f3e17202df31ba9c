"""The test helpers must themselves be trustworthy: bounds that can fail, generators that hit their targets."""

import pytest
import torch

from twell import _alloc
from twell.testing import (
    EPS,
    assert_close,
    make_sparse_activations,
    make_sparse_ffn,
    poison_allocations,
    rel_error,
)


def test_assert_close_fails_on_nan_first():
    ref = torch.ones(4, dtype=torch.float64)
    bad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    with pytest.raises(AssertionError, match="out: NaN pattern differs"):
        assert_close(bad, ref, name="out")
    assert_close(torch.tensor([float("nan")]), torch.tensor([float("nan")], dtype=torch.float64), name="nan")


def test_assert_close_bound_scales_with_dtype():
    ref = torch.linspace(1, 2, 100, dtype=torch.float64)
    off = ref * (1 + 20 * EPS[torch.float32])  # 20 ulp: too much for fp32, nothing for bf16
    with pytest.raises(AssertionError, match="y: relative error"):
        assert_close(off.float(), ref, name="y")
    assert_close(off.bfloat16(), ref, name="y")
    with pytest.raises(AssertionError, match="shape"):
        assert_close(ref[:3].float(), ref, name="y")
    # a baseline with a large error of its own widens the bound to twice that error
    base = ref * 1.01
    assert_close((ref * 1.015).float(), ref, name="y", baseline=base)
    with pytest.raises(AssertionError):
        assert_close((ref * 1.05).float(), ref, name="y", baseline=base)


def test_rel_error():
    assert rel_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])) == pytest.approx(0.5)
    assert rel_error(torch.zeros(2), torch.zeros(2)) == 0.0


@pytest.mark.parametrize("pattern", ["iid", "skewed", "heavy"])
def test_make_sparse_activations_hits_target(pattern):
    h = make_sparse_activations(2000, 1024, 20, pattern=pattern, seed=1)
    per_row = (h > 0).sum(1).float()
    assert (h != 0).all()
    if pattern == "heavy":
        assert per_row.max() >= 250
        assert per_row.median() == pytest.approx(20, rel=0.3)
    else:
        assert per_row.mean() == pytest.approx(20, rel=0.1)
    if pattern == "skewed":
        dead = ((h > 0).sum(0) == 0).float().mean()
        assert dead >= 0.29


@pytest.mark.parametrize("pattern", ["iid", "skewed", "heavy"])
def test_make_sparse_ffn_hits_target(pattern):
    x, wg, wu, wd = make_sparse_ffn(2048, 128, 2048, 30, pattern=pattern, seed=2)
    act = (x @ wg.T > 0).sum(1).float()
    assert wg.shape == (2048, 128) and wd.shape == (128, 2048)
    assert act.median() == pytest.approx(30, rel=0.35)
    if pattern == "heavy":
        assert act.max() >= 150


def test_generators_reject_bad_arguments():
    with pytest.raises(ValueError, match="pattern"):
        make_sparse_activations(2, 8, 1, pattern="zipf")
    with pytest.raises(ValueError, match="active_per_row"):
        make_sparse_activations(2, 8, 9)
    with pytest.raises(ValueError, match="K: needs at least 2"):
        make_sparse_ffn(2, 1, 8, 1)


def test_poison_allocations():
    with poison_allocations():
        f = _alloc.empty((3,), dtype=torch.bfloat16, device="cpu")
        i = _alloc.empty((3,), dtype=torch.int32, device="cpu")
        s = _alloc.empty((3,), dtype=torch.int16, device="cpu")
    assert torch.isnan(f).all()
    assert (i == _alloc.INT_POISON).all()
    assert (s == torch.iinfo(torch.int16).min).all()
    assert _alloc._state["poison"] is False


def test_make_sparse_ffn_dead_units_have_finite_thresholds():
    x, wg, wu, wd = make_sparse_ffn(16, 32, 400, 5, pattern="skewed")
    assert torch.isfinite(wg).all()
    assert not (x @ wg.T > 0).any(dim=0)[(wg[:, 0] < -0.6)].any()
