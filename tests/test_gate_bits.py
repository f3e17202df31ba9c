"""gate_bits: the gate GEMM that also writes the bitmask of g's active entries (the row kernels'
forward), against gate_bits_ref.

On CPU (Triton's interpreter) in float32 with integer-valued inputs, so g is exact and the
bitmask must match bit for bit; on CUDA also in bf16 / fp16, where g may differ from the
reference by rounding and the bitmask must match the kernel's own g exactly.
"""

import pytest
import torch

from twell.ops._triton import can_run_triton
from twell.ops.gate_bits import active_bits, gate_bits_ok, gate_bits_ref, launch_gate_bits


def _operands(M, K, N, active, seed, device, dtype=torch.float32):
    """Integer-valued x [M, K] and w [N, K] with about `active` of g > 0 (column 0 of x is 1 and
    column 0 of w an integer threshold), plus a fully active token, an inactive one and a NaN
    one where M allows."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (M, K), generator=gen).float()
    w = torch.randint(-2, 3, (N, K), generator=gen).float()
    x[:, 0] = 1.0
    rest = x[:, 1:] @ w[:, 1:].T
    if active >= 1:
        w[:, 0] = rest.abs().max() + 1
    elif active <= 0:
        w[:, 0] = -(rest.abs().max() + 1)
    else:
        sample = rest.flatten()[:: max(1, rest.numel() // 1_000_000)]  # quantile() caps its input
        w[:, 0] = -torch.floor(torch.quantile(sample, 1.0 - active))
    if M >= 4:
        x[1, 0] = 1000.0  # every unit active (w[:, 0] >= 1 except where it is 0)
        x[2, 0] = -1000.0 if active < 1 else 1.0
        x[3, 1] = float("nan")
    return x.to(device, dtype), w.to(device, dtype)


def _run(x, w):
    M, N = x.shape[0], w.shape[0]
    g = torch.full((M, N), -7.0, dtype=x.dtype, device=x.device)
    bits = torch.full((M, (N + 31) // 32), -7, dtype=torch.int32, device=x.device)
    launch_gate_bits(x, w, g, bits)
    return g, bits


@pytest.mark.parametrize(
    "M, K, N, active",
    [
        (7, 96, 300, 0.05),  # N not a multiple of 32 or of the 256-column tile
        (130, 16, 1000, 0.02),  # several row blocks and column tiles, K below one step
        (1, 40, 32, 0.5),  # one token, one word
        (9, 24, 40, 0.0),  # nothing active but the forced rows
        (9, 24, 40, 1.0),  # everything active
    ],
)
def test_gate_bits_vs_reference(kdevice, M, K, N, active):
    x, w = _operands(M, K, N, active, seed=M + N, device=kdevice)
    assert gate_bits_ok(x, w, "always")
    g, bits = _run(x, w)
    g_ref, bits_ref = gate_bits_ref(x, w)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(bits, bits_ref)
    if M >= 4:
        assert torch.isnan(g[3]).all() and (bits[3, : N // 32] == -1).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M, K, N", [(16384, 2048, 5632), (300, 4096, 14336), (77, 896, 4864)])
def test_gate_bits_16bit_gpu(dtype, M, K, N):
    # the shapes of the benchmark registry; the bitmask of the kernel's own (rounded) g, exactly
    x, w = _operands(M, K, N, 0.01, seed=3, device="cuda")
    x, w = x.to(dtype), (w / 64).to(dtype)  # |g| within fp16's range
    assert gate_bits_ok(x, w, "auto")
    g, bits = _run(x, w)
    g_ref = (x.double() @ w.double().t()).to(dtype)
    torch.testing.assert_close(g, g_ref, equal_nan=True)
    assert torch.equal(bits, active_bits(g))


def test_gate_bits_ok_rules():
    x = torch.zeros(4, 16)
    w = torch.zeros(40, 16)
    # "always" takes any aligned operands where Triton runs (here: the interpreter)
    assert gate_bits_ok(x, w, "always") == can_run_triton(x)
    assert not gate_bits_ok(x, w, "never")
    assert not gate_bits_ok(x, w, "auto")  # CPU: never the default
    assert not gate_bits_ok(x, torch.zeros(41, 16), "always")  # g rows not 16-byte aligned
    assert not gate_bits_ok(torch.zeros(4, 18)[:, :16], w, "always")  # x rows 72 bytes apart
    assert not gate_bits_ok(torch.zeros(0, 16), w, "always")
    with pytest.raises(ValueError, match="gate_bits mode"):
        gate_bits_ok(x, w, "sometimes")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "M, K, N", [(16384, 2048, 5632), (300, 4096, 14336), (77, 896, 4864), (1000, 96, 1000), (513, 2048, 704)]
)
def test_gate_bits_ws_bitexact(dtype, M, K, N):
    # the specialised-warps kernel (Gluon, Hopper) writes the Triton kernel's g and bitmask bit
    # for bit: rows off the 128-row tiles, N off the 256-column tiles, a fully active, an
    # inactive and a NaN token
    from twell.ops.configs import override
    from twell.ops.gate_bits_ws import ws_bits_ok
    from twell.ops.gate_pack import _BROKEN

    x, w = _operands(M, K, N, 0.01, seed=5, device="cuda")
    x, w = x.to(dtype), (w / 64).to(dtype)
    if not ws_bits_ok(x, w, torch.empty(M, N, dtype=dtype, device="cuda")):
        pytest.skip("needs Hopper and Gluon")
    with override("gate", ws_min_m=0):
        g1, b1 = _run(x, w)
    with override("gate", use_ws="never"):
        g2, b2 = _run(x, w)
    assert "ws-bits" not in _BROKEN, _BROKEN.get("ws-bits")
    assert torch.equal(g1.view(torch.int16), g2.view(torch.int16))
    assert torch.equal(b1, b2)
    assert torch.isnan(g1[3]).all()
