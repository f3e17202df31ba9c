"""The reference FFN (the oracle for every kernel): forward, the four gradients, statistics, bad input."""

import pytest
import torch

import twell
from twell.ops.ffn_ref import sparse_ffn_ref, tile_overflow_rows
from twell.testing import assert_close, make_sparse_ffn

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
K = 40


def density_inputs(M, N, density, dtype, seed=0):
    active = {"0%": 0.0, "1%": 0.01 * N, "50%": 0.5 * N, "100%": float(N)}[density.replace("dense-row", "1%")]
    x, wg, wu, wd = make_sparse_ffn(M, K, N, active, seed=seed, weight_std=0.2)
    if density == "dense-row":
        x[M // 2, 0] = -50.0  # column 0 carries -tau_n: a negative value turns every unit on
    return [t.to(dtype) for t in (x, wg, wu, wd)]


def fp64_reference(x, wg, wu, wd, gy, coeff):
    ts = [t.detach().double().requires_grad_() for t in (x, wg, wu, wd)]
    g = ts[0] @ ts[1].T
    h = torch.relu(g) * (ts[0] @ ts[2].T)
    y = h @ ts[3].T
    l1 = h.abs().sum(-1).mean()
    ((y * gy.double()).sum() + coeff * l1).backward()
    return y, l1, (g > 0).sum(-1).double().mean(), [t.grad for t in ts]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", [1, 100, 255, 256, 1000, 5632])
@pytest.mark.parametrize("M", [1, 7, 300])
def test_forward_and_gradients_match_fp64(M, N, dtype):
    density = {1: "100%", 100: "50%", 255: "0%", 256: "1%", 1000: "dense-row", 5632: "1%"}[N]
    x, wg, wu, wd = density_inputs(M, N, density, dtype)
    gy = torch.randn(M, K).to(dtype)
    coeff = 0.05
    y_ref, l1_ref, l0_ref, grads_ref = fp64_reference(x, wg, wu, wd, gy, coeff)

    leaves = [t.clone().requires_grad_() for t in (x, wg, wu, wd)]
    y, st = twell.sparse_ffn(*leaves, return_stats=True, backend="reference")
    ((y.float() * gy.float()).sum() + coeff * st.l1).backward()

    red = max(M, N, K)
    assert_close(y, y_ref, name="y", reduce=red)
    assert_close(st.l1, l1_ref, name="l1", dtype=dtype, reduce=red)
    assert st.l0.item() == pytest.approx(l0_ref.item())
    for name, t, ref in zip(["dx", "dW_gate", "dW_up", "dW_down"], leaves, grads_ref):
        assert_close(t.grad, ref, name=name, reduce=red)


def test_l1_statistic_and_gradient():
    x, wg, wu, wd = density_inputs(33, 300, "50%", torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, wg, wu, wd)]
    y, st = twell.sparse_ffn(*leaves, return_stats=True)
    coeff = 3e-4
    pen = twell.l1_penalty(st, coeff)
    pen.backward()
    h = torch.relu(x @ wg.T) * (x @ wu.T)
    assert pen.item() == pytest.approx(coeff * h.abs().sum(-1).mean().item(), rel=1e-6)
    # d/dh of coeff * mean_tokens(sum |h|) = coeff * sign(h) / M, pushed through h = relu(g) * u
    dh = coeff * torch.sign(h) / x.shape[0]
    du = dh * torch.relu(x @ wg.T)
    dg = dh * (x @ wu.T) * (x @ wg.T > 0)
    torch.testing.assert_close(leaves[0].grad, dg @ wg + du @ wu)
    torch.testing.assert_close(leaves[1].grad, dg.T @ x)
    torch.testing.assert_close(leaves[2].grad, du.T @ x)
    assert leaves[3].grad is None or torch.count_nonzero(leaves[3].grad) == 0


def test_stats_l0_overflow_and_unit_counts():
    M, N = 50, 600
    x, wg, wu, wd = density_inputs(M, N, "1%", torch.float32)
    x[3, 0] = -50.0  # token 3: every unit active -> its tiles overflow 32 slots
    y, st = sparse_ffn_ref(x, wg, wu, wd, unit_counts=True)
    act = x @ wg.T > 0
    assert st.tokens == M
    assert st.l0.item() == pytest.approx(act.sum().item() / M)
    assert st.overflow_rows.item() == 1
    assert torch.equal(st.unit_counts, act.sum(0))
    assert tile_overflow_rows(act, 256, 600).item() == 0


def test_nan_token_propagates_only_to_its_row():
    x, wg, wu, wd = density_inputs(6, 300, "50%", torch.float32)
    x[2, 5] = float("nan")
    y = twell.sparse_ffn(x, wg, wu, wd)
    assert torch.isnan(y[2]).all()
    assert not torch.isnan(y[torch.arange(6) != 2]).any()


def test_leading_dims_and_empty_input():
    x, wg, wu, wd = density_inputs(24, 128, "50%", torch.float32)
    y = twell.sparse_ffn(x.view(2, 3, 4, K), wg, wu, wd)
    assert y.shape == (2, 3, 4, K)
    torch.testing.assert_close(y.reshape(24, K), twell.sparse_ffn(x, wg, wu, wd))
    y0, st0 = twell.sparse_ffn(x[:0], wg, wu, wd, return_stats=True)
    assert y0.shape == (0, K) and st0.tokens == 0 and st0.l0.item() == 0


def test_sparse_gated_mlp_matches_functional_and_keeps_hf_names():
    mlp = twell.SparseGatedMLP(K, 96, l1_coeff=1e-3, track_unit_counts=True)
    assert sorted(n for n, _ in mlp.named_parameters()) == [
        "down_proj.weight",
        "gate_proj.weight",
        "up_proj.weight",
    ]
    assert mlp.down_proj.weight.shape == (K, 96)
    x = torch.randn(2, 5, K)
    y = mlp(x)
    ref = twell.sparse_ffn(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    torch.testing.assert_close(y, ref)
    assert mlp.tokens_seen == 10
    assert mlp.unit_counts.sum().item() == pytest.approx(mlp.last_stats.l0.item() * 10)
    pen = twell.l1_penalty(mlp)
    assert pen.item() == pytest.approx(1e-3 * mlp.last_stats.l1.item())
    pen.backward()
    assert mlp.gate_proj.weight.grad is not None
    # a plain state dict of the same names loads unchanged
    sd = {k: torch.randn_like(v) for k, v in mlp.state_dict().items()}
    mlp.load_state_dict(sd)


def test_l1_penalty_over_layers_and_errors():
    seq = torch.nn.Sequential(
        twell.SparseGatedMLP(K, 64, l1_coeff=2.0), twell.SparseGatedMLP(K, 64, l1_coeff=2.0)
    )
    with pytest.raises(RuntimeError, match="run a forward pass first"):
        twell.l1_penalty(seq)
    seq(torch.randn(4, K))
    l1s = [m.last_stats.l1 for m in seq]
    assert twell.l1_penalty(seq).item() == pytest.approx(2.0 * (l1s[0] + l1s[1]).item() / 2)
    assert twell.l1_penalty(seq, coeff=1.0).item() == pytest.approx((l1s[0] + l1s[1]).item() / 2)
    stats = twell.sparsity_stats(seq)
    assert set(stats) == {"0", "1"} and stats["0"]["tokens"] == 4
    with pytest.raises(ValueError, match="no sparse MLP"):
        twell.l1_penalty(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="coeff"):
        twell.l1_penalty(seq[0].last_stats)
    with pytest.raises(TypeError, match="source"):
        twell.l1_penalty(3)


def _ok():
    return [torch.randn(5, K), torch.randn(64, K), torch.randn(64, K), torch.randn(K, 64)]


@pytest.mark.parametrize(
    "i, value, exc, match",
    [
        (0, "x", TypeError, "x: expected a torch.Tensor"),
        (0, torch.ones(5, K, dtype=torch.int64), TypeError, "x: dtype int64"),
        (0, torch.ones(5, K, dtype=torch.float64), TypeError, "w_gate: dtype torch.float32 differs"),
        (1, torch.randn(64 * K), ValueError, "w_gate: expected a 2-D tensor"),
        (1, torch.randn(64, K + 1), ValueError, r"w_gate: expected shape \[N, K=40\]"),
        (2, torch.randn(63, K), ValueError, r"w_up: expected shape \[N=64, K=40\]"),
        (3, torch.randn(64, K), ValueError, r"w_down: expected shape \[K=40, N=64\]"),
        (3, torch.randn(K, 64, dtype=torch.float16), TypeError, "w_down: dtype torch.float16 differs"),
        (2, torch.randn(64, K, device="meta"), ValueError, "w_up: on device meta but x is on cpu"),
        (0, torch.randn(()), ValueError, "x: expected at least 1"),
    ],
)
def test_bad_input(i, value, exc, match):
    args = _ok()
    args[i] = value
    with pytest.raises(exc, match=match):
        twell.sparse_ffn(*args)


def test_bad_options():
    with pytest.raises(ValueError, match="backend: expected"):
        twell.sparse_ffn(*_ok(), backend="cuda")
    with pytest.raises(ValueError, match="tile: must be a power of two"):
        twell.sparse_ffn(*_ok(), tile=100)
    with pytest.raises(ValueError, match="intermediate_size"):
        twell.SparseGatedMLP(8, 0)


def test_unit_limit_on_kernel_backend():
    N = 65537
    x, wg, wu, wd = torch.randn(1, 2), torch.randn(N, 2), torch.randn(N, 2), torch.randn(2, N)
    with pytest.raises(ValueError, match="w_gate: N=65537 exceeds"):
        twell.sparse_ffn(x, wg, wu, wd, backend="triton")


def test_float64_has_no_kernel():
    args = [t.double() for t in _ok()]
    with pytest.raises(TypeError, match="x: dtype torch.float64 has no kernel"):
        twell.sparse_ffn(*args, backend="triton")
    assert twell.sparse_ffn(*args).dtype == torch.float64


def test_l1_penalty_refuses_stats_without_autograd():
    mlp = twell.SparseGatedMLP(K, 64, l1_coeff=1.0)
    with torch.no_grad():
        mlp(torch.randn(3, K))
    with pytest.raises(RuntimeError, match="ran without autograd"):
        twell.l1_penalty(mlp)
    mlp.eval()  # evaluation statistics are fine to read
    assert twell.l1_penalty(mlp).requires_grad is False


def test_mlp_without_stats_returns_output_only():
    mlp = twell.SparseGatedMLP(K, 64, collect_stats=False)
    y = mlp(torch.randn(3, K))
    assert y.shape == (3, K) and mlp.last_stats is None
