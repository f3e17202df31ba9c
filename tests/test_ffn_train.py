"""CPU tests of the training kernels (Triton interpreter, fp32, small odd shapes).

Each case: forward y, l0, l1, overflow count and the four gradients against fp64 autograd of the
reference FFN, with a random upstream gradient on y and an L1 term on stats.l1.
"""

import pytest
import torch
import triton

from twell.ops import ffn_train as ft
from twell.ops.ffn_ref import sparse_ffn_ref
from twell.testing import assert_close, make_sparse_ffn

L1 = 0.37


def _inputs(M, K, N, a, *, pattern="iid", seed=0, device="cpu"):
    x, wg, wu, wd = make_sparse_ffn(M, K, N, a, pattern=pattern, dtype=torch.float64, seed=seed)
    # make_sparse_ffn puts -inf/+inf thresholds on never/always active units: keep them finite
    wg = torch.nan_to_num(wg, posinf=100.0, neginf=-100.0)
    return [t.float().to(device) for t in (x, wg, wu, wd)]


def _check(
    x, wg, wu, wd, *, deterministic=False, tile=256, slots=32, unit_counts=False, reduce=1, dispatch=True
):
    # reduce: the longest sum behind an element of y (see assert_close); 1 unless a test makes
    # a token with many active units. dispatch=False: the kernels whatever M is (on CUDA small
    # calls otherwise take the dense path)
    leaves = [t.clone().requires_grad_() for t in (x, wg, wu, wd)]
    y, st = ft.ffn_train(
        *leaves,
        tile=tile,
        slots=slots,
        unit_counts=unit_counts,
        deterministic=deterministic,
        dispatch=dispatch,
    )
    dy = torch.randn_like(y)
    torch.autograd.backward([y, st.l1], [dy, torch.full_like(st.l1, L1)])
    ref = [t.detach().double().requires_grad_() for t in (x, wg, wu, wd)]
    yr, sr = sparse_ffn_ref(*ref, tile=tile, slots=slots, unit_counts=unit_counts)
    torch.autograd.backward([yr, sr.l1], [dy.double(), torch.full_like(sr.l1, L1)])
    assert_close(y, yr, name="y", reduce=reduce)
    for name, t, r in zip(("dx", "dw_gate", "dw_up", "dw_down"), leaves, ref):
        assert_close(t.grad, r.grad, name=name, dtype=torch.float32, factor=64)
    assert_close(st.l1.detach().reshape(1), sr.l1.detach().reshape(1), name="l1", factor=64)
    assert float(st.l0) == pytest.approx(float(sr.l0), abs=1e-5)
    assert int(st.overflow_rows) == int(sr.overflow_rows)
    if unit_counts:
        assert torch.equal(st.unit_counts, sr.unit_counts)
    return y, st, leaves


@pytest.mark.parametrize(
    "M, K, N, a",
    [
        (13, 40, 100, 1.0),  # ~1%
        (7, 33, 70, 35.0),  # 50%, odd K and N (N not a multiple of 32)
        (1, 16, 33, 4.0),  # one token
    ],
)
def test_forward_backward_vs_fp64(kdevice, poison, M, K, N, a):
    _check(*_inputs(M, K, N, a, device=kdevice))


@pytest.mark.parametrize("M, K, N, a", [(13, 40, 100, 1.0), (7, 32, 72, 35.0), (9, 16, 300, 6.0)])
def test_forward_backward_with_gate_bits(kdevice, poison, monkeypatch, M, K, N, a):
    # the forward's gate GEMM writing the bitmask (gate_bits, forced: by default it runs on Hopper
    # in 16-bit dtypes only) and the pack reading it: the same checks as above, with a row past
    # the row capacity (its bitmask walked) and NaN in one token
    monkeypatch.setattr(ft, "CONFIG", ft.TrainConfig(gate_bits="always", gate_bits_min_m=0, row_capacity=8))
    launches = []
    real = ft.launch_gate_bits
    monkeypatch.setattr(ft, "launch_gate_bits", lambda *args: launches.append(1) or real(*args))
    x, wg, wu, wd = _inputs(M, K, N, a, device=kdevice, seed=M)
    x[M // 2, 0] = -50.0  # column 0 carries the threshold: every unit of this token active
    _check(x, wg, wu, wd, reduce=N, dispatch=False)  # that token's y sums N terms
    assert launches
    x[1] = float("nan")
    y, st = ft.ffn_train(x, wg, wu, wd, dispatch=False)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any()


def test_zero_and_full_density(kdevice, poison):
    x, wg, wu, wd = _inputs(9, 24, 40, 4.0, device=kdevice)
    x2 = x.clone()
    x2[:, 1:] = 0.0  # g = w_gate[:, 0] < 0 everywhere: nothing active (0%)
    _check(x2, -wg.abs() - 0.01, wu, wd)
    wg_all = wg.clone()
    wg_all[:, 0] = 100.0  # every unit active on every token (100%)
    _, st, _ = _check(x, wg_all, wu, wd, tile=16, slots=4, unit_counts=True)
    assert float(st.l0) == 40.0 and int(st.overflow_rows) == 9


def test_heavy_rows_past_row_capacity(kdevice, poison, monkeypatch):
    # capacity W = 4: sparse rows use the packed row index, the fully active token and the heavy
    # ones walk the bitmask; units past the by-unit capacity E = M * W walk the transposed bitmask
    monkeypatch.setattr(
        ft,
        "CONFIG",
        ft.TrainConfig(row_capacity=4, chunk=3, unit_block_k=8, unit_group=2, row_group=2, unit_programs=1),
    )
    x, wg, wu, wd = _inputs(11, 20, 45, 2.0, device=kdevice, seed=3)
    x[4, 0] = -50.0  # column 0 carries the (negative) threshold: token 4 gets every unit active
    for det in (False, True):
        _, st, _ = _check(x, wg, wu, wd, deterministic=det, unit_counts=True)
        assert float(st.l0) > 45 / 11


@pytest.mark.parametrize("det", [False, True])
def test_weight_gradients_in_token_blocks(kdevice, poison, monkeypatch, det):
    # the backward's weight gradients over blocks of 5 tokens (3 blocks, the last of 1 token),
    # each with its own index; capacity W = 4 so that a fully active token and units past the
    # block's E = 5 * W take the fallback walks
    cfg = ft.TrainConfig(wgrad_block_rows=5, row_capacity=4, chunk=3, unit_block_k=8, unit_programs=1)
    monkeypatch.setattr(ft, "CONFIG", cfg)
    x, wg, wu, wd = _inputs(11, 20, 45, 2.0, device=kdevice, seed=3)
    x[4, 0] = -50.0  # column 0 carries the (negative) threshold: token 4 gets every unit active
    _check(x, wg, wu, wd, deterministic=det, unit_counts=True)


def test_deterministic_repeat_and_chunked_match(kdevice):
    x, wg, wu, wd = _inputs(37, 24, 64, 6.0, device=kdevice, seed=4)
    runs = []
    for det in (True, True, False):
        leaves = [t.clone().requires_grad_() for t in (x, wg, wu, wd)]
        y, st = ft.ffn_train(*leaves, deterministic=det)
        torch.autograd.backward([y, st.l1], [torch.ones_like(y), torch.full_like(st.l1, 0.5)])
        runs.append([y.detach()] + [t.grad for t in leaves])
    for a, b, c in zip(*runs):
        assert torch.equal(a, b)
        assert_close(c, a.double(), name="chunked vs per-unit", factor=64)


def test_nan_input_propagates(kdevice):
    x, wg, wu, wd = _inputs(5, 16, 40, 3.0, device=kdevice)
    x[2, 3] = float("nan")
    y, st = ft.ffn_train(x, wg, wu, wd)
    yr, _ = sparse_ffn_ref(x.double(), wg.double(), wu.double(), wd.double())
    assert torch.equal(torch.isnan(y), torch.isnan(yr))
    assert torch.isnan(y[2]).all() and not torch.isnan(y[[0, 1, 3, 4]]).any()


def test_empty_batch(kdevice):
    x, wg, wu, wd = _inputs(4, 16, 40, 3.0, device=kdevice)
    x0 = x[:0].clone().requires_grad_()
    w = wg.clone().requires_grad_()
    y, st = ft.ffn_train(x0, w, wu, wd)
    assert y.shape == (0, 16)
    (y.sum() + st.l1).backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_checkpoint_matches(kdevice):
    from torch.utils.checkpoint import checkpoint

    x, wg, wu, wd = _inputs(6, 16, 40, 4.0, device=kdevice, seed=5)
    xr = x.clone().requires_grad_()
    g1 = torch.autograd.grad(ft.ffn_train(xr, wg, wu, wd, dispatch=False)[0].sum(), xr)[0]
    g2 = torch.autograd.grad(
        checkpoint(lambda t: ft.ffn_train(t, wg, wu, wd, dispatch=False)[0], xr, use_reentrant=False).sum(),
        xr,
    )[0]
    assert torch.equal(g1, g2)


def test_opcheck(kdevice):
    x, wg, wu, wd = _inputs(5, 16, 40, 4.0, device=kdevice, seed=6)
    args = [t.clone().requires_grad_() for t in (x, wg, wu, wd)]
    torch.library.opcheck(
        ft._fwd_op,
        (*args, 256, 32, True, True),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_bad_input():
    x, wg, wu, wd = _inputs(4, 16, 40, 3.0)
    with pytest.raises(ValueError, match="x"):
        ft.ffn_train(x[None], wg, wu, wd)
    with pytest.raises(TypeError, match="w_up"):
        ft.ffn_train(x, wg, wu.double(), wd)
    with pytest.raises(ValueError, match="w_down"):
        ft.ffn_train(x, wg, wu, wd.t())
    with pytest.raises(ValueError, match="tile"):
        ft.ffn_train(x, wg, wu, wd, tile=100)


def test_dense_path_matches_reference():
    x, wg, wu, wd = _inputs(9, 16, 64, 20.0, seed=7)
    for tile, slots in ((16, 3), (32, 40 // 4)):  # N % tile == 0 and the padded case below
        y, st = ft.ffn_train_ref(x, wg, wu, wd, tile=tile, slots=slots, unit_counts=True)
        yr, sr = sparse_ffn_ref(x, wg, wu, wd, tile=tile, slots=slots, unit_counts=True)
        assert torch.equal(y, yr) and torch.equal(st.unit_counts, sr.unit_counts)
        assert int(st.overflow_rows) == int(sr.overflow_rows) and float(st.l0) == float(sr.l0)
        assert_close(st.l1.reshape(1), sr.l1.reshape(1), name="l1")
    y, st = ft.ffn_train_ref(x[:, :], wg[:60], wu[:60], wd[:, :60], tile=16, slots=3)
    yr, sr = sparse_ffn_ref(x, wg[:60], wu[:60], wd[:, :60], tile=16, slots=3)
    assert int(st.overflow_rows) == int(sr.overflow_rows)


@pytest.mark.parametrize("two_passes", [False, True])
def test_row_kernels_in_one_and_two_passes(kdevice, monkeypatch, two_passes):
    # forward rows and dx rows in one pass, or in two (forward: g, u of the slots, then y with
    # the rows above W; dx: the W_gate term stored, then the W_up term added), with rows above W
    # among the others
    cfg = ft.TrainConfig(fwd_two_passes=two_passes, dx_two_passes=two_passes, row_capacity=6, row_group=2)
    monkeypatch.setattr(ft, "CONFIG", cfg)
    x, wg, wu, wd = _inputs(7, 33, 70, 4.0, device=kdevice, seed=8)
    x[2, 0] = -50.0  # column 0 carries the (negative) threshold: token 2 gets every unit active
    for det in (False, True):
        _check(x, wg, wu, wd, deterministic=det)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [64, 40, 48, 33])
@pytest.mark.parametrize("pairs", [True, False])
def test_forward_16bit_rows(kdevice, monkeypatch, dtype, K, pairs):
    # 16-bit forward: rows read as int32 pairs (even K: a power of two, and not) or as 16-bit
    # tiles (odd K, x 2 bytes off a 4-byte boundary, or fwd_pairs off), with a row above W
    # (bitmask walk), odd counts of slots and a NaN token;
    # y and l1 against fp64 from the same 16-bit inputs, g and u rounded as the kernels keep them
    if dtype == torch.bfloat16 and kdevice == "cpu":
        pytest.skip("Triton's interpreter compares bf16 values as raw 16-bit integers (g > 0 is wrong)")
    cfg = ft.TrainConfig(row_capacity=6, row_group=2, fwd_pairs=pairs)
    monkeypatch.setattr(ft, "CONFIG", cfg)
    x, wg, wu, wd = (t.to(dtype) for t in _inputs(9, K, 70, 3.0, device=kdevice, seed=K))
    # unit 0 is never active and its W_down column is inf: the padding entry of an odd count
    # (row index 0, h = 0) must not reach it
    wg[0] = 0.0
    wd[:, 0] = float("inf")
    if K == 48:
        # x as a view that starts 2 bytes into its storage: no int32 pairs from it
        buf = torch.empty(x.numel() + 1, dtype=dtype, device=x.device)
        buf[1:] = x.flatten()
        x = buf[1:].view(x.shape)

    def ref():
        g = (x @ wg.t()).double()
        h = torch.where(g > 0, g, 0.0) * (x @ wu.t()).to(dtype).double()
        return h[:, 1:] @ wd[:, 1:].double().t(), h.abs().sum() / x.shape[0]

    y, st = ft.ffn_train(x, wg, wu, wd, dispatch=False)
    yr, l1r = ref()
    assert_close(y, yr, name="y (rows within W)", dtype=dtype)
    assert float(st.l1) == pytest.approx(float(l1r), rel=1e-2)
    # every unit active for token 4 (above W: its bitmask is walked); the other rows as before
    x[4, 0] = -50.0
    y2, _ = ft.ffn_train(x, wg, wu, wd, dispatch=False)
    assert_close(y2[4:5], ref()[0][4:5], name="y (row above W)", dtype=dtype)
    rows = [m for m in range(x.shape[0]) if m != 4]
    assert torch.equal(y2[rows], y[rows])
    # a NaN token: NaN in its row of y and in l1, the other rows as before
    x[6] = float("nan")
    y3, st3 = ft.ffn_train(x, wg, wu, wd, dispatch=False)
    assert torch.isnan(y3[6]).all() and torch.isnan(st3.l1)
    rows = [m for m in range(x.shape[0]) if m != 6]
    assert torch.equal(y3[rows], y2[rows])


def test_tiny_training_follows_reference(kdevice):
    # 20 SGD steps with an MSE loss + the L1 term: the kernels' loss curve is the torch path's
    x, wg, wu, wd = _inputs(12, 16, 48, 8.0, device=kdevice, seed=9)
    target = 0.1 * torch.randn(12, 16, generator=torch.Generator().manual_seed(1)).to(kdevice)

    def train(fn):
        params = [t.clone().requires_grad_() for t in (wg, wu, wd)]
        opt = torch.optim.SGD(params, lr=30.0)  # large: the pattern changes along the way (l0 6 -> 4)
        losses = []
        for _ in range(20):
            y, st = fn(x, *params)
            loss = (y - target).square().mean() + 1e-3 * st.l1
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return torch.tensor(losses, dtype=torch.float64)

    ours = train(lambda *a: ft.ffn_train(*a))
    ref = train(lambda *a: sparse_ffn_ref(*a))
    assert ours[-1] < 0.95 * ours[0]
    assert torch.allclose(ours, ref, rtol=1e-5, atol=0), (ours - ref).abs().max()


def test_compile_fullgraph_and_backward_op(kdevice):
    x, wg, wu, wd = _inputs(6, 16, 40, 4.0, device=kdevice, seed=10)

    def f(x, wg, wu, wd):
        y, st = ft.ffn_train(x, wg, wu, wd)
        return y.square().sum() + st.l1

    leaves = [t.clone().requires_grad_() for t in (x, wg, wu, wd)]
    torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves).backward()
    ref = [t.clone().requires_grad_() for t in (x, wg, wu, wd)]
    f(*ref).backward()
    for a, b in zip(leaves, ref):
        assert torch.equal(a.grad, b.grad) or torch.allclose(a.grad, b.grad, rtol=1e-6, atol=0)
    y, l1, l0, over, uc, cols, counts, pat, gu = ft._fwd_op(x, wg, wu, wd, 256, 32, False, True)
    dy = torch.randn_like(y)
    torch.library.opcheck(
        ft._bwd_op,
        (dy, torch.tensor(0.3, device=kdevice), x, wg, wu, wd, cols, counts, pat, gu, True),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_dispatch_and_checkpoint_keep_one_path(kdevice):
    # dense weights (~50 % active): the first call measures the density and runs the kernels; a
    # checkpoint's recomputation inside the backward must replay that choice, and the next call
    # switches to the dense path
    from torch.utils.checkpoint import checkpoint

    x, wg, wu, wd = _inputs(8, 16, 40, 20.0, device=kdevice, seed=11)
    ws = [t.clone().requires_grad_() for t in (wg, wu, wd)]
    xr = x.clone().requires_grad_()
    out = checkpoint(lambda t: ft.ffn_train(t, *ws)[0], xr, use_reentrant=False)
    out.square().sum().backward()
    g_ckpt = xr.grad.clone()
    assert ft._dispatch_dense(ws[0])  # measured above CONFIG.dense_density
    xr.grad = None
    y, st = ft.ffn_train(xr, *ws)  # dense path now
    y.square().sum().backward()
    assert_close(xr.grad, g_ckpt.double(), name="dx dense vs kernels", factor=64)
    y2, _ = ft.ffn_train(xr, *ws, dispatch=False)
    assert_close(y, y2.double(), name="y dense vs kernels", factor=64)


def _ran_sparse_op(fn) -> bool:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return any("twell::ffn_train_fwd" in e.key for e in prof.key_averages())


def test_small_call_rule_is_cuda_only(kdevice, monkeypatch):
    import dataclasses

    monkeypatch.setattr(ft, "CONFIG", dataclasses.replace(ft.CONFIG, dense_below_m=10**9))
    x, wg, wu, wd = (t.float() for t in _inputs(7, 16, 40, 3, device=kdevice))
    sparse = _ran_sparse_op(lambda: ft.ffn_train(x, wg, wu, wd))
    assert sparse == (kdevice == "cpu")  # on CUDA the small call runs the dense path
    assert _ran_sparse_op(lambda: ft.ffn_train(x, wg, wu, wd, dispatch=False))


def _pack_expected(g, W, tile, slots):
    # torch reference of the forward's packed pattern: first W active units per row, counts,
    # bitmask words, active units before each word, tile-overflow flag, per-unit counts
    M, N = g.shape
    NW = (N + 31) // 32
    a = (g > 0) | torch.isnan(g)
    cnt = a.sum(1).to(torch.int32)
    a_pad = torch.zeros((M, NW * 32), dtype=torch.bool)
    a_pad[:, :N] = a
    words = a_pad.view(M, NW, 32).to(torch.int64) << torch.arange(32)
    bits = words.sum(2)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    per_word = a_pad.view(M, NW, 32).sum(2)
    wpre = (per_word.cumsum(1) - per_word).to(torch.int32)
    nt = (N + tile - 1) // tile
    a_t = torch.zeros((M, nt * tile), dtype=torch.int32)
    a_t[:, :N] = a
    ovf = (a_t.view(M, nt, tile).sum(2) > slots).any(1).to(torch.int32)
    cols = [torch.nonzero(r).flatten()[:W].to(torch.int32) for r in a]
    return cnt, bits, wpre, ovf, a.sum(0).to(torch.int32), cols


@pytest.mark.parametrize(
    "N, tile, block, warps",
    [
        (100, 16, 256, 1),
        (300, 64, 256, 1),
        (1000, 256, 256, 1),
        (1000, 512, 256, 1),
        (1000, 256, 1024, 1),
        (33, 16, 64, 1),
        (300, 16, 256, 2),  # 64 lanes x 8 columns
        (1000, 256, 4096, 4),  # 128 lanes x 32 columns
        (1000, 64, 1024, 4),  # 128 lanes x 8 columns
    ],
)
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_pack_kernel_vs_torch(kdevice, monkeypatch, N, tile, block, warps, prefetch):
    # tiles of up to 32 columns (within a word), within a step of `block` columns, and spanning
    # several steps; 1, 2 and 4 warps (32 lanes each); bit 31 of the words, NaN, an empty and a
    # fully active row (past W = 40); g at the slots; rows walked last to first (the default) and
    # first to last
    cfg = ft.TrainConfig(
        pack_block=block,
        pack_warps=warps,
        row_capacity=40,
        pack_prefetch=prefetch,
        pack_reverse=prefetch != 2,
    )
    monkeypatch.setattr(ft, "CONFIG", cfg)
    _pack_case(kdevice, N, tile, from_bits=False)


@pytest.mark.parametrize(
    "N, tile, warps",
    [(100, 16, 1), (33, 16, 1), (1000, 256, 1), (1000, 512, 1), (300, 64, 2), (1000, 256, 4)],
)
@pytest.mark.parametrize("count_units", [True, False])
def test_pack_kernel_from_bits(kdevice, monkeypatch, N, tile, warps, count_units):
    # the pack reading the bitmask that gate_bits wrote (one word per lane and step) and g only at
    # the active entries: the same outputs, the words left as they were; without the per-unit
    # counts (the inference prefill without unit_counts) they stay 0
    monkeypatch.setattr(ft, "CONFIG", ft.TrainConfig(pack_bits_warps=warps, row_capacity=40))
    _pack_case(kdevice, N, tile, from_bits=True, count_units=count_units)


def _pack_case(kdevice, N, tile, from_bits, count_units=True):
    M, W, slots = 7, 40, 5
    gen = torch.Generator().manual_seed(N + tile)
    g = torch.randn((M, N), generator=gen) - 2.0  # ~2% active
    g[2] = torch.randn(N, generator=gen).abs() + 0.1  # a fully active row (past W)
    g[3] = -1.0  # an empty row
    g[4, 5::7] = float("nan")  # NaN counts as active
    g[5, 31::32] = 1.0  # bit 31 of every word
    cols = torch.full((M, W), -1, dtype=torch.int32, device=kdevice)
    counts = torch.zeros((M + N,), dtype=torch.int32, device=kdevice)
    NW = (N + 31) // 32
    pat = torch.full((2, M, NW), -7, dtype=torch.int32, device=kdevice)
    ovf = torch.full((M,), -7, dtype=torch.int32, device=kdevice)
    gs = torch.full((M, W), -3.0, device=kdevice)
    cnt, bits, wpre, ovf_r, ucnt, cols_r = _pack_expected(g, W, tile, slots)
    if from_bits:
        pat[0] = bits.to(kdevice)
    u_out = counts[M:] if count_units else None
    ft._launch_pack(
        g.to(kdevice), gs, cols, counts[:M], pat[0], pat[1], ovf, u_out, W, tile, slots, from_bits
    )
    if not count_units:
        ucnt = torch.zeros_like(ucnt)
    assert torch.equal(counts[:M].cpu(), cnt)
    assert torch.equal(counts[M:].cpu(), ucnt)
    assert torch.equal(pat[0].cpu(), bits)
    assert torch.equal(pat[1].cpu(), wpre)
    assert torch.equal(ovf.cpu(), ovf_r)
    for m in range(M):
        c = cols_r[m]
        assert torch.equal(cols[m, : len(c)].cpu(), c), f"row {m}"
        torch.testing.assert_close(gs[m, : len(c)].cpu(), g[m, c.long()], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("N, ch", [(5, 3), (1500, 4), (2100, 1)])
def test_items_kernels_vs_torch(kdevice, N, ch):
    # offsets, work items (split in chunks of ch; a unit past the capacity E is one item) and
    # item -> unit map against the torch formulation; several 1024-unit blocks, empty units
    gen = torch.Generator().manual_seed(N)
    ucnt = torch.randint(0, 9, (N,), generator=gen, dtype=torch.int32)
    ucnt[::7] = 0
    E = int(ucnt.sum()) * 3 // 4  # the last units spill
    dev = kdevice
    uoff = torch.full((N + 1,), -5, dtype=torch.int64, device=dev)
    se = torch.full((2, N), -5, dtype=torch.int64, device=dev)
    multi = torch.full((N,), -5, dtype=torch.int32, device=dev)
    flags = torch.full((2, N), -5, dtype=torch.int32, device=dev)
    ft._k("items")[(1,)](ucnt.to(dev), uoff, se[0], se[1], multi, flags, N, E, ch, BN=1024)
    n_items = (E + ch - 1) // ch + N
    unit = torch.full((n_items,), -5, dtype=torch.int32, device=dev)
    ft._k("item_units")[(triton.cdiv(n_items, 1024),)](se[1], unit, N, n_items, N.bit_length(), BI=1024)
    off = torch.zeros(N + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(ucnt.long(), 0)
    spilled = off[1:] > E
    items = torch.where(spilled, 1, ((ucnt.long() + ch - 1) // ch).clamp(min=1))
    end = torch.cumsum(items, 0)
    assert torch.equal(uoff.cpu(), off)
    assert torch.equal(se[1].cpu(), end) and torch.equal(se[0].cpu(), end - items)
    assert torch.equal(multi.cpu(), (spilled | (ucnt > ch)).to(torch.int32))
    assert int(flags.abs().sum()) == 0
    assert torch.equal(unit.cpu().long(), torch.searchsorted(end, torch.arange(n_items), right=True))
