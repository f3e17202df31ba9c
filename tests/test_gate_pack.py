"""gate_pack: the gate GEMM with the TwELL epilogue, against TwELL.from_dense(relu(x @ W_gate^T)).

CPU runs go through Triton's interpreter in float32 with integer-valued inputs, so every dot
product is exact and the packing must match bit for bit (GPU tests in bf16/fp16 are in
test_infer_gpu.py).
"""

import pytest
import torch

from twell.format import TwELL
from twell.ops.configs import override
from twell.ops.gate_pack import gate_pack, gate_pack_arrays, gate_pack_ref


def _int_inputs(M, K, N, density, seed=0, device="cpu"):
    """Integer-valued x [M, K], w [N, K] (exact fp32 dot products) with about `density` of g > 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (M, K), generator=g).float()
    w = torch.randint(-3, 4, (N, K), generator=g).float()
    x[:, 0] = 1.0
    # column 0 of w shifts each unit's threshold: a quantile of the remaining dot product
    rest = x[:, 1:] @ w[:, 1:].T
    q = torch.quantile(rest.flatten(), 1.0 - density) if 0 < density < 1 else None
    if density <= 0:
        w[:, 0] = -(rest.abs().max() + 1)
    elif density >= 1:
        w[:, 0] = rest.abs().max() + 1
    else:
        w[:, 0] = -torch.floor(q)  # an integer threshold keeps the sums exact
    return x.to(device), w.to(device)


def _check_packing(P: TwELL, x, w, tile, slots):
    ref = TwELL.from_dense(torch.relu(x @ w.T), tile, slots, keep_overflow=False)
    assert P.counts.dtype == torch.int32 and P.values.dtype == x.dtype and P.columns.dtype == torch.int16
    assert torch.equal(P.counts, ref.counts), "counts differ"
    S = slots
    used = torch.arange(S, device=x.device).view(1, 1, S) < P.counts.clamp(max=S).unsqueeze(-1)
    assert torch.equal(P.columns[used], ref.columns[used]), "stored columns differ"
    assert torch.equal(P.values[used], ref.values[used]), "stored values differ"
    if int((P.counts > S).sum()) == 0:
        P.validate()
        assert torch.equal(P.to_dense(), torch.relu(x @ w.T))


@pytest.mark.parametrize(
    "M,K,N,tile,slots,density",
    [
        (1, 16, 40, 16, 2, 0.1),
        (7, 96, 300, 256, 32, 0.05),
        (130, 16, 1000, 64, 4, 0.05),
        (5, 24, 530, 512, 8, 0.02),
    ],
)
def test_gate_pack_matches_from_dense(kdevice, poison, M, K, N, tile, slots, density):
    x, w = _int_inputs(M, K, N, density, device=kdevice)
    P = gate_pack(x, w, tile=tile, slots=slots)
    _check_packing(P, x, w, tile, slots)


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_gate_pack_extreme_density(kdevice, poison, density):
    M, K, N, tile, slots = 9, 16, 300, 64, 8
    x, w = _int_inputs(M, K, N, density, device=kdevice)
    P = gate_pack(x, w, tile=tile, slots=slots)
    _check_packing(P, x, w, tile, slots)
    widths = torch.tensor([64, 64, 64, 64, 44], dtype=torch.int32, device=kdevice)
    assert torch.equal(P.counts, widths.expand(M, -1) if density else torch.zeros_like(P.counts))


def test_gate_pack_dense_row_and_nan_row(kdevice, poison):
    M, K, N, tile, slots = 6, 16, 200, 64, 4
    x, w = _int_inputs(M, K, N, 0.03, device=kdevice)
    x[2, 0] = 1000.0 * float(torch.sign(w[0, 0]))  # every unit of token 2 active: all its tiles overflow
    x[4, 5] = float("nan")  # NaN propagates: every entry of token 4 is active (NaN)
    P = gate_pack(x, w, tile=tile, slots=slots)
    ref = TwELL.from_dense(torch.relu(x @ w.T), tile, slots, keep_overflow=False)
    assert torch.equal(P.counts, ref.counts)
    assert torch.equal(P.counts[2], torch.tensor([64, 64, 64, 8], dtype=torch.int32, device=kdevice))
    assert torch.equal(P.counts[4], P.counts[2])
    assert torch.isnan(P.values[4, :, :slots]).all()
    keep = torch.ones(M, dtype=torch.bool)
    keep[[2, 4]] = False
    _check_packing(
        TwELL(P.counts[keep], P.values[keep], P.columns[keep], (int(keep.sum()), N), tile, slots),
        x[keep],
        w,
        tile,
        slots,
    )


def test_gate_pack_tma_kernel_in_interpreter(kdevice, poison):
    # the persistent tensor-descriptor kernel, forced on (on CPU its inline-asm store is off)
    x, w = _int_inputs(70, 32, 300, 0.05, device=kdevice)
    with override("gate", use_tma="always"):
        P = gate_pack(x, w, tile=64, slots=8)
    _check_packing(P, x, w, 64, 8)


def test_gate_pack_noncontiguous(kdevice, poison):
    x, w = _int_inputs(40, 32, 100, 0.1, device=kdevice)
    xt = x.t().contiguous().t()  # same values, column-major
    wt = w.t().contiguous().t()
    P = gate_pack(xt, wt, tile=32, slots=4)
    _check_packing(P, x, w, 32, 4)


def test_gate_pack_ref_and_torch_backend():
    x, w = _int_inputs(7, 16, 90, 0.1)
    P = gate_pack(x, w, tile=32, slots=4, backend="torch")
    _check_packing(P, x, w, 32, 4)
    c, v, col = gate_pack_ref(x, w, 32, 4)
    assert torch.equal(c, P.counts)


def test_gate_pack_opcheck(kdevice):
    x, w = _int_inputs(5, 16, 70, 0.1, device=kdevice)
    # the torch path of the op (the Triton path leaves unused slots unwritten, which opcheck's
    # repeated-run comparison would flag)
    torch.library.opcheck(torch.ops.twell.gate_pack.default, (x, w, 32, 4, False))
    counts, values, columns = gate_pack_arrays(x, w, tile=32, slots=4)
    assert counts.shape == (5, 3) and values.shape == (5, 3, 4) and columns.shape == (5, 3, 4)


def test_gate_pack_bad_input():
    x = torch.randn(4, 16)
    w = torch.randn(32, 16)
    with pytest.raises(ValueError, match="w_gate"):
        gate_pack(x, torch.randn(32, 8))
    with pytest.raises(TypeError, match="w_gate"):
        gate_pack(x, w.double().float().half())
    with pytest.raises(ValueError, match="x"):
        gate_pack(x[0], w)
    with pytest.raises(ValueError, match="tile"):
        gate_pack(x, w, tile=48)
    with pytest.raises(ValueError, match="slots"):
        gate_pack(x, w, tile=16, slots=17)
    with pytest.raises(TypeError, match="x"):
        gate_pack(x.long(), w)
    with pytest.raises(ValueError, match="backend"):
        gate_pack(x, w, backend="cuda")


def test_ws_handover_layout_and_rules():
    # The specialised-warps kernels (Gluon, Hopper; their outputs are tested on the GPU) hand a
    # [BM, BN] tile over in shared memory through handover_layout, and the epilogue reads it back
    # as BN / 32 blocks of [BM, 32] in a SwizzledSharedLayout(8, 2, 4) (also TMA's 64-byte
    # swizzle): the two views must address the same element at every offset.
    from twell.ops import _gate_ws as ws

    if not ws.ws_available():
        pytest.skip("this Triton has no Gluon")
    rows, cols = ws.BM, ws.BN
    bases = ws.handover_layout(rows, cols).offset_bases
    assert len(bases) == (rows * cols).bit_length() - 1
    seen = set()
    for off in range(rows * cols):
        r = c = 0
        for b, (dr, dc) in enumerate(bases):
            if off >> b & 1:
                r, c = r ^ dr, c ^ dc
        seen.add((r, c))
        j, cc = divmod(c, 32)  # block, column in the block
        swizzled = r * 32 + ((cc // 8) ^ ((r // 2) % 4)) * 8 + cc % 8
        assert off == j * rows * 32 + swizzled, (off, r, c)
    assert len(seen) == rows * cols  # a bijection
    # CPU tensors never take the Gluon kernels
    x, w = torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(512, 64, dtype=torch.bfloat16)
    assert not ws.ws_ok(x, w)
