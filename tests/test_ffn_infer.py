"""ffn_infer: every path (prefill, decode, dense, auto) against the float64 torch reference.

CPU runs go through Triton's interpreter in float32 at small odd shapes; bf16/fp16 at model
shapes, CUDA graphs and torch.compile are in test_infer_gpu.py.
"""

import contextlib
import warnings

import pytest
import torch

from twell.ops.configs import override
from twell.ops.ffn_infer import choose_path, down_t, ffn_infer
from twell.ops.ffn_ref import sparse_ffn_ref
from twell.testing import assert_close, make_sparse_ffn, poison_allocations

# "prefill-tiles": the prefill through gate_pack and the per-token up/down over TwELL
# (InferConfig.prefill_rows off); "prefill" runs the row kernels shared with the training forward
SPARSE_PATHS = ["prefill", "prefill-tiles", "decode", "dense"]


def _path(path):
    """(ffn_infer path, config context) of a test path name."""
    if path == "prefill-tiles":
        return "prefill", override("infer", prefill_rows=False)
    return path, contextlib.nullcontext()


def _ref(x, wg, wu, wd, tile, slots):
    """float64 reference (y, stats) and torch's own result in x's dtype (the error baseline)."""
    y64, st = sparse_ffn_ref(
        x.double(), wg.double(), wu.double(), wd.double(), tile=tile, slots=slots, unit_counts=True
    )
    y_torch, _ = sparse_ffn_ref(x, wg, wu, wd, tile=tile, slots=slots)
    return y64, st, y_torch


def _check(x, wg, wu, wd, tile, slots, path, stats=True, reduce=1):
    # reduce: terms of the longest sum behind an output element whose order the kernel does not
    # fix (fp32 atomics add in arrival order on a GPU): the bound grows with its square root
    run, ctx = _path(path)
    with ctx:
        y, st = ffn_infer(x, wg, wu, wd, tile=tile, slots=slots, path=run, unit_counts=True)
    y64, sr, y_torch = _ref(x, wg, wu, wd, tile, slots)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, y64, name=f"y[{path}]", dtype=x.dtype, baseline=y_torch, reduce=reduce)
    if stats:
        assert float(st.l0) == pytest.approx(float(sr.l0), rel=1e-6), "l0"
        assert float(st.l1) == pytest.approx(float(sr.l1), rel=1e-4), "l1"
        assert int(st.overflow_rows) == int(sr.overflow_rows), "overflow_rows"
        assert torch.equal(st.unit_counts.cpu(), sr.unit_counts.cpu()), "unit_counts"
        assert st.tokens == x.shape[0]
    return y, st


@pytest.mark.parametrize("path", SPARSE_PATHS)
@pytest.mark.parametrize(
    "M,K,N,active,tile,slots",
    [(1, 16, 40, 3, 16, 2), (7, 96, 300, 10, 256, 32), (13, 16, 300, 12, 64, 4)],
)
def test_paths_match_reference(kdevice, poison, path, M, K, N, active, tile, slots):
    x, wg, wu, wd = make_sparse_ffn(M, K, N, active, device=kdevice, seed=M + N)
    _check(x, wg, wu, wd, tile, slots, path)


@pytest.mark.parametrize("path", SPARSE_PATHS)
@pytest.mark.parametrize("active", [0, 40])
def test_zero_and_full_density(kdevice, poison, path, active):
    # 0 active units (y = 0) and every unit active (every tile overflows: recomputed, counted)
    x, wg, wu, wd = make_sparse_ffn(5, 16, 40, active, device=kdevice, seed=3)
    y, st = _check(x, wg, wu, wd, 16, 4, path)
    if active == 0:
        assert not y.any()
        assert int(st.overflow_rows) == 0
    else:
        assert int(st.overflow_rows) == 5


@pytest.mark.parametrize("path", SPARSE_PATHS)
def test_dense_token_among_sparse_ones(kdevice, poison, path):
    x, wg, wu, wd = make_sparse_ffn(9, 32, 200, 4, device=kdevice, seed=5)
    x[4, 0] = -30.0  # column 0 carries the (negative) threshold: token 4 activates every unit
    y, st = _check(x, wg, wu, wd, 64, 8, path)
    assert int(st.overflow_rows) >= 1


@pytest.mark.parametrize("two_passes", [False, True])
def test_prefill_one_and_two_passes(kdevice, poison, two_passes):
    # prefill up/down in one launch, or two (h over g in the packed values, then y): sparse
    # tokens, a token activating every unit (its tiles overflow and are recomputed whole), NaN
    x, wg, wu, wd = make_sparse_ffn(9, 32, 200, 4, device=kdevice, seed=5)
    x[4, 0] = -30.0
    with override("infer", prefill_two_passes=two_passes, prefill_rows=False):
        y, st = _check(x, wg, wu, wd, 64, 8, "prefill")
        assert int(st.overflow_rows) >= 1
        x[2, 5] = float("nan")
        y2, _ = ffn_infer(x, wg, wu, wd, tile=64, slots=8, path="prefill")
    assert torch.isnan(y2[2]).all() and not torch.isnan(y2[[0, 1, 3, 4, 5, 6, 7, 8]]).any()


def test_prefill_rows_in_chunks(kdevice, poison):
    # the row-kernel prefill in chunks of 4 tokens (3 calls for 9): y, l0, l1, overflow rows and
    # unit counts combined across the chunks, a token activating every unit in the middle chunk
    x, wg, wu, wd = make_sparse_ffn(9, 32, 200, 4, device=kdevice, seed=5)
    x[5, 0] = -30.0
    with override("infer", prefill_rows_chunk=4):
        _, st = _check(x, wg, wu, wd, 64, 8, "prefill")
    assert int(st.overflow_rows) >= 1


@pytest.mark.parametrize("path", SPARSE_PATHS)
def test_nan_token_stays_in_its_row(kdevice, poison, path):
    x, wg, wu, wd = make_sparse_ffn(6, 32, 100, 5, device=kdevice, seed=7)
    x[3, 7] = float("nan")
    run, ctx = _path(path)
    with ctx:
        y, _ = ffn_infer(x, wg, wu, wd, tile=32, slots=4, path=run)
    assert torch.isnan(y[3]).all()
    keep = torch.tensor([0, 1, 2, 4, 5])
    y64, _, y_torch = _ref(x[keep], wg, wu, wd, 32, 4)
    assert_close(y[keep], y64, name=f"y[{path}] without the NaN token", dtype=x.dtype, baseline=y_torch)


@pytest.mark.parametrize("path", ["prefill", "prefill-tiles", "decode"])
def test_noncontiguous_inputs(kdevice, poison, path):
    x, wg, wu, wd = make_sparse_ffn(7, 48, 120, 6, device=kdevice, seed=11)
    xs = torch.stack([x, x], dim=2).reshape(7, 96)[:, ::2]  # stride 2 along K, same values
    wds = wd.t().contiguous().t()  # W_down stored transposed (already [N, K] contiguous underneath)
    run, ctx = _path(path)
    with ctx:
        y, _ = ffn_infer(xs, wg, wu, wds, tile=64, slots=8, path=run)
    y64, _, y_torch = _ref(x, wg, wu, wd, 64, 8)
    assert_close(y, y64, name="y", dtype=x.dtype, baseline=y_torch)


def test_auto_dispatch_and_choose_path(kdevice, poison):
    with override("infer", decode_max_m=4, prefill_min_m=5, dense_above_prefill=20.0):
        assert choose_path(4, 1000, None) == "decode"
        assert choose_path(5, 1000, None) == "prefill"
        assert choose_path(5, 1000, 10.0) == "prefill"
        assert choose_path(5, 1000, 500.0) == "dense"
        assert choose_path(1, 1000, 5.0) == "decode"
    with override("infer", decode_max_m=4, prefill_min_m=100):
        assert choose_path(50, 1000, None) == "dense"  # between the two: dense (measured faster)
    with override("infer", decode_max_m=16, decode_dense_union=0.12):
        # decode while the batch's union of active units stays small: 16 tokens x 30 of 5632 units
        # touch ~8 % of the units, 16 x 100 ~25 %
        assert choose_path(16, 5632, 30.0) == "decode"
        assert choose_path(16, 5632, 100.0) == "dense"
        assert choose_path(1, 5632, 600.0) == "decode" and choose_path(1, 5632, 800.0) == "dense"
    with override(
        "infer", decode_max_m=64, decode_union_max_m=128, decode_union_reach_k=4096, prefill_min_m=512
    ):
        # decode to 128 tokens at K >= 4096 where the union form may run (not in deterministic
        # mode or under capture), else dense; below K = 4096 (where the form also runs) decode
        # stops at decode_max_m
        assert choose_path(128, 14336, None, 4096, True) == "decode"
        assert choose_path(128, 14336, 30.0, 4096, True) == "decode"
        assert choose_path(129, 14336, None, 4096, True) == "dense"
        assert choose_path(128, 14336, None, 4096, False) == "dense"
        assert choose_path(65, 5632, None, 2048, True) == "dense"
        assert choose_path(64, 5632, None, 2048, True) == "decode"
        assert choose_path(128, 5632, None, 2048, True) == "dense"
        assert choose_path(64, 5632, None, 2048, False) == "decode"
    with override("infer", decode_max_m=4, prefill_min_m=5, dense_above_prefill=20.0):
        x, wg, wu, wd = make_sparse_ffn(6, 16, 64, 40, device=kdevice, seed=2)
        y1, _ = _check(x, wg, wu, wd, 16, 4, "auto")  # first call: sparse, measures ~40 active
        y2, _ = _check(x, wg, wu, wd, 16, 4, "auto")  # second call: dense (40 > 20)
        assert torch.allclose(y1, y2, rtol=1e-5, atol=1e-6)


def test_density_from_host_slot():
    # the dispatcher's estimate from the pinned slot the decode kernels store l0 into (here a plain
    # CPU tensor stands for it): read on the first calls, then once in density_every calls; -1
    # (nothing stored yet) is not a measurement; each value read is folded in once (the slot goes
    # back to -1), and a call whose kernels stored l0 queues no copy
    from twell.ops import ffn_infer as fi

    w = torch.zeros(4, 4)
    d = fi._density_entry(w)
    d.slot = torch.full((1,), -1.0)
    fi._poll(d)
    assert d.est is None
    d.slot.fill_(30.0)
    fi._poll(d)
    assert d.est == 30.0 and d.slot.item() == -1.0
    with override("infer", density_every=4, ema=0.5):
        l0 = torch.zeros(()).cuda() if torch.cuda.is_available() else None
        for call in range(1, 8):
            if l0 is not None:
                fi._record(d, l0, stored=True)
                assert d.event is None  # no copy queued
            else:
                d.calls += 1
            d.slot.fill_(10.0)
            fi._poll(d)
            # calls 4 (one in density_every) read the slot: 30 -> 20
            assert d.est == (20.0 if call >= 4 else 30.0), call


def test_stats_optional_and_down_t_cache(kdevice):
    x, wg, wu, wd = make_sparse_ffn(3, 16, 40, 4, device=kdevice)
    y, st = ffn_infer(x, wg, wu, wd, tile=16, slots=4, return_stats=False)
    assert st is None and y.shape == (3, 16)
    t1 = down_t(wd)
    assert down_t(wd) is t1 and torch.equal(t1, wd.t())
    wd.mul_(2.0)  # an in-place change invalidates the cached transposed copy
    assert torch.equal(down_t(wd), wd.t())


def test_ffn_infer_opcheck(kdevice):
    x, wg, wu, wd = make_sparse_ffn(5, 16, 40, 4, device=kdevice)
    torch.library.opcheck(torch.ops.twell.ffn_infer.default, (x, wg, wu, wd, 16, 4, True, "prefill"))
    torch.library.opcheck(torch.ops.twell.ffn_infer.default, (x, wg, wu, wd, 16, 4, False, "decode"))


def test_ffn_infer_bad_input():
    x, wg, wu, wd = make_sparse_ffn(3, 16, 40, 4)
    with pytest.raises(ValueError, match="w_up"):
        ffn_infer(x, wg, wu[:, :8], wd)
    with pytest.raises(ValueError, match="w_down"):
        ffn_infer(x, wg, wu, wd.t())
    with pytest.raises(TypeError, match="w_gate"):
        ffn_infer(x, wg.half(), wu, wd)
    with pytest.raises(ValueError, match="x"):
        ffn_infer(x.unsqueeze(0), wg, wu, wd)
    with pytest.raises(ValueError, match="path"):
        ffn_infer(x, wg, wu, wd, path="fast")
    with pytest.raises(ValueError, match="tile"):
        ffn_infer(x, wg, wu, wd, tile=100)


@pytest.mark.parametrize("atomic", [0, 1], ids=["split-down", "atomic-down"])
@pytest.mark.parametrize("active", [0, 5, 100])
def test_decode_single_token(kdevice, poison, active, atomic):
    # M = 1: the compacted walk over active units in the split down kernel, or the gate + up
    # programs' atomic adds
    x, wg, wu, wd = make_sparse_ffn(1, 48, 300, active, device=kdevice, seed=active)
    with override("infer", decode_atomic_max_m=atomic):
        _check(x, wg, wu, wd, 64, 8, "decode")
        x[0, 9] = float("nan")
        y, _ = ffn_infer(x, wg, wu, wd, tile=64, slots=8, path="decode")
    assert torch.isnan(y).all()


@pytest.mark.parametrize("path", ["auto", "prefill", "decode", "dense"])
def test_empty_batch_and_no_stats(kdevice, poison, path):
    x, wg, wu, wd = make_sparse_ffn(4, 16, 40, 4, device=kdevice)
    y, st = ffn_infer(x[:0], wg, wu, wd, tile=16, slots=4, path=path, unit_counts=True)
    assert y.shape == (0, 16) and float(st.l0) == 0.0 and int(st.overflow_rows) == 0
    assert torch.equal(st.unit_counts, torch.zeros(40, dtype=torch.int64, device=kdevice))
    y, st = ffn_infer(x, wg, wu, wd, tile=16, slots=4, path=path, return_stats=False)
    y64, _, y_torch = _ref(x, wg, wu, wd, 16, 4)
    assert st is None
    assert_close(y, y64, name=f"y[{path}, no stats]", dtype=x.dtype, baseline=y_torch)


@pytest.mark.parametrize("M", [2, 16, 33])
@pytest.mark.parametrize(
    "plan",
    [
        dict(decode_down_sub=64, decode_partial_mib=16, decode_gemv_max_m=0),
        dict(decode_down_sub=32, decode_partial_mib=0, decode_gemv_max_m=0),
        dict(decode_down_sub=64, decode_partial_mib=16, decode_gemv_max_m=64),
        dict(decode_down_sub=64, decode_partial_mib=16, decode_gemv_max_m=0, decode_dot_swap=False),
        dict(decode_down_sub=64, decode_partial_mib=16, decode_gemv_max_m=0, decode_h_t=False),
        dict(decode_down_sub=32, decode_partial_mib=0, decode_gemv_max_m=64, decode_h_t=False),
        dict(decode_gemv_max_m=0, decode_pdl=False, decode_bn_dot=16),
        dict(decode_gemv_max_m=0, decode_bk=16, decode_bk_up=32),
    ],
    ids=[
        "split",
        "one-split",
        "gemv",
        "unswapped-dot",
        "row-major-h",
        "gemv-row-major-h",
        "no-pdl-bn16",
        "bk-up",
    ],
)
def test_decode_batches_and_split_plans(kdevice, poison, M, plan):
    # M > 1 gathers the batch's active W_down^T rows into tl.dot chunks. Defaults: the gate + up
    # tl.dot with the units on the MMA's M side, h unit-major between the stages, the down kernel
    # launched with programmatic dependent launch (CUDA only); each plan turns one off. bk-up: the
    # W_up loop with a longer K step than the gate loop (K = 32: 2 gate steps, 1 up step). gemv: the
    # gate + up stage on CUDA cores, one token at a time; decode_partial_mib=0 forces a single
    # split whose walk spans many compacted sub-ranges of `sub` units
    # (every atomic form off, the unit, chunk and union forms included: the split form's sums run
    # in a fixed order, which the error bound assumes; the unit form ran here at M = 2 with the
    # gate on tensor cores, and its arrival-order sums went past the bound in 1 of a few GPU runs)
    from twell.ops import ffn_infer as fi

    x, wg, wu, wd = make_sparse_ffn(M, 32, 300, 6, device=kdevice, seed=M)
    x[M // 2, 0] = -30.0  # one fully active token: every unit is in the batch's union
    off = dict(decode_atomic_max_m=0, decode_atomic_dot_min_m=0, decode_units_max_m=0, decode_chunk_max_m=0)
    off.update(decode_chunk_long_max_m=0, decode_union_max_m=0)
    with override("infer", decode_down_chunk=16, **off, **plan):
        assert not fi._decode_plan(M, 32, 300, fi.get_config("infer"))["atomic"]
        _check(x, wg, wu, wd, 64, 8, "decode")


def test_decode_scratch_reused_between_calls(kdevice):
    # without poisoning, eager decode calls of one shape reuse one scratch set; a call with other
    # inputs (a fully active token, then a sparse batch again) still matches the reference
    from twell.ops import ffn_infer as fi

    x, wg, wu, wd = make_sparse_ffn(3, 48, 300, 6, device=kdevice, seed=5)
    dense_x = x.clone()
    dense_x[1, 0] = -30.0
    fi._SCRATCH.clear()
    for xi, n in ((x, 48), (dense_x, 300), (x, 48)):
        # n: the longest sum in another order than torch's, the K = 48-term gate and up dot
        # products, or the 300 unit terms of the fully active token, which the unit form (M = 3)
        # adds by atomics in arrival order (H100: 1.27e-6 against an 8-eps bound of 1.13e-6)
        _check(xi, wg, wu, wd, 64, 8, "decode", reduce=n)
    assert len(fi._SCRATCH) == 1
    with poison_allocations():  # poisoned calls allocate afresh
        _check(x, wg, wu, wd, 64, 8, "decode", reduce=48)
    assert len(fi._SCRATCH) == 1


@pytest.mark.parametrize(
    "M,K,gemv,bk_up,compact",
    [
        (1, 48, 2, 0, False),
        (2, 48, 2, 0, False),
        (1, 40, 2, 16, False),
        (2, 40, 2, 16, False),
        (20, 48, 0, 0, False),
        (33, 40, 0, 0, False),
        (3, 48, 0, 0, True),
        (7, 40, 0, 0, True),
    ],
    ids=[
        "gemv-one-step-1",
        "gemv-one-step-2",
        "gemv-k-loop-1",
        "gemv-k-loop-2",
        "dot-20",
        "dot-33",
        "dot-compact-3",
        "dot-compact-7",
    ],
)
def test_decode_atomic_down(kdevice, poison, M, K, gemv, bk_up, compact):
    # the gate + up programs add h W_down^T into an fp32 accumulator by atomics (CUDA-core form
    # at M <= gemv, tl.dot form above: compacting the program's active units 16 at a time, always
    # up to 16 tokens, or with 32 / 64 token rows); a second kernel rounds it into y and zeroes it. Sparse, none active, every unit
    # active (all tiles overflow), a NaN token, and repeated calls (the reused accumulator must
    # start at zero)
    from twell.ops import ffn_infer as fi

    plan = dict(
        decode_atomic_max_m=2,
        decode_atomic_dot_min_m=3,
        decode_units_max_m=0,
        decode_chunk_max_m=0,
        decode_chunk_long_max_m=0,
        decode_gemv_max_m=gemv,
        decode_bk_up=bk_up,
        decode_atomic_bk=16,
        decode_atomic_compact=compact,
        decode_atomic_bkc=16,
    )
    with override("infer", **plan):
        p = fi._decode_plan(M, K, 300, fi.get_config("infer"))
        assert p["atomic"] and p["one_step"] == (bk_up == 0 and M <= gemv) and p["compact"] == compact
        _check_atomic_decode(kdevice, M, K, lambda active: 1)


def _count_calls(monkeypatch, module, name):
    # a list that grows by one entry per call of module.name (which still runs)
    calls = []
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or fn(*a, **k))
    return calls


def _check_atomic_decode(kdevice, M, K, reduce):
    # sparse, none active, every unit active (all tiles overflow), a NaN token, and a call after
    # it (the reused accumulator must start at zero again); reduce(active): the error bound's sum
    for active in (12, 0, 300, 12):
        x, wg, wu, wd = make_sparse_ffn(M, K, 300, active, device=kdevice, seed=M + K + active)
        y, st = _check(x, wg, wu, wd, 64, 8, "decode", reduce=reduce(active))
        assert bool(y.any()) == (active > 0)
        if active in (0, 300):  # (the sparse batches may overflow a tile: _check compares them)
            assert int(st.overflow_rows) == (M if active == 300 else 0)
    x[M - 1, 5] = float("nan")
    y, _ = ffn_infer(x, wg, wu, wd, tile=64, slots=8, path="decode")
    assert torch.isnan(y[M - 1]).all() and not torch.isnan(y[: M - 1]).any()
    x[M - 1, 5] = 0.0
    _check(x, wg, wu, wd, 64, 8, "decode", reduce=reduce(12))  # the NaN sums did not stay in the accumulator


@pytest.mark.parametrize("M,K,bk,r", [(3, 96, 0, 8), (8, 40, 16, 4), (5, 200, 64, 16)])
def test_decode_units_form(kdevice, poison, M, K, bk, r):
    # 3 <= M <= decode_units_max_m: the gate kernel computes the gate only and a second kernel
    # runs the up/down of the active units, r units per program (whole K row per load, or
    # bk-column steps); sparse, none active, every unit active, a NaN token, repeated calls on
    # the reused accumulator
    from twell.ops import ffn_infer as fi

    with override(
        "infer", decode_units_max_m=8, decode_units_bk=bk, decode_units_per_program=r, decode_chunk_min_m=9
    ):
        p = fi._decode_plan(M, K, 300, fi.get_config("infer"))
        assert p["units"] and p["atomic"] and not p["compact"]
        assert (p["bk_units"] >= K) == (bk == 0)
        # K-term dot products summed in another order than torch's, and each unit's terms
        # reaching the accumulator by atomics in arrival order
        _check_atomic_decode(kdevice, M, K, lambda active: max(K, active))


@pytest.mark.parametrize(
    "M,K,bkd,chd,early",
    [
        (3, 96, 32, 64, False),
        (5, 40, 16, 16, True),
        (8, 200, 64, 32, False),
        (8, 200, 64, 32, True),
        (16, 48, 32, 256, False),
        (24, 72, 16, 32, True),
    ],
)
def test_decode_barrier_form(kdevice, poison, monkeypatch, M, K, bkd, chd, early):
    # one launch on the GPU (gate + up, grid-wide barrier, down by column blocks straight into
    # y); under the CPU interpreter its two phases as two launches. Sparse, none active, every
    # unit active (the list holds all 300 units), a NaN token, and calls after it (the counters
    # must be back at zero); `early`: the list's atomic add issued before the up
    from twell.ops import decode_barrier as db
    from twell.ops import ffn_infer as fi
    from twell.ops.decode_barrier import barrier_counters

    launches = _count_calls(monkeypatch, db, "launch_decode_barrier")
    plan = dict(
        decode_barrier_min_m=1,
        decode_barrier_max_m=64,
        decode_barrier_bkd=bkd,
        decode_barrier_chunk=chd,
        decode_barrier_up_bk=64,
        decode_barrier_early_list=early,
        decode_units_max_m=0,
        decode_chunk_max_m=0,
        decode_chunk_long_max_m=0,
        # the plan's count of programs that fit at once (the SMs; 4 under the interpreter):
        # enough for the 5 gate blocks of 300 units
        decode_chunk_programs=16,
    )
    with override("infer", **plan):
        assert fi._decode_plan(M, K, 300, fi.get_config("infer"), programs=16)["barrier"]
        _check_atomic_decode(kdevice, M, K, lambda active: max(K, active))
        assert not barrier_counters(torch.device(kdevice)).any()
    assert len(launches) == 6  # every call of _check_atomic_decode ran this form
    # deterministic mode: another form (the list's order is the programs' arrival order)
    with override("infer", **plan):
        torch.use_deterministic_algorithms(True)
        try:
            assert not fi._decode_plan(M, K, 300, fi.get_config("infer"))["barrier"]
        finally:
            torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize(
    "M,K,up,chunk,bkd,stages,split",
    [
        (3, 96, 8, 128, 16, 5, 1),
        (5, 40, 4, 16, 32, 2, 3),
        (8, 200, 16, 64, 64, 3, 2),
        (17, 48, 8, 32, 16, 1, 4),
        (24, 72, 2, 16, 16, 4, 1),
    ],
)
def test_decode_pairs_form(kdevice, poison, monkeypatch, M, K, up, chunk, bkd, stages, split):
    # three launches: the gate kernel lists the active (token, unit) pairs, the up kernel computes
    # `up` pairs a step (whole rows), the down kernel sums `chunk` pairs per tl.dot into `bkd`
    # output columns per program, the list split in `split` ranges per column block (fp32
    # partials summed behind a ticket). Sparse, none active (an empty list), every unit active
    # (all M x 300 pairs listed), a NaN token, and calls after it (the counters must be back at
    # zero, the tickets start at zero again)
    from twell.ops import decode_pairs as dpair
    from twell.ops import ffn_infer as fi

    launches = _count_calls(monkeypatch, dpair, "launch_decode_pairs")
    plan = dict(
        decode_pairs_min_m=1,
        decode_pairs_max_m=64,
        decode_pairs_min_k=0,
        decode_pairs_short_min_m=0,
        decode_pairs_up=up,
        decode_pairs_up_short=up,  # (K < 4096 here)
        decode_pairs_up_bk=64,
        decode_pairs_chunk=chunk,
        decode_pairs_bkd=bkd,
        decode_pairs_stages=stages,
        decode_pairs_split=split,
    )
    with override("infer", **plan):
        assert fi._decode_plan(M, K, 300, fi.get_config("infer"))["pairs"]
        # K-term dot products summed in another order than torch's, pairs summed in list order
        _check_atomic_decode(kdevice, M, K, lambda active: max(K, active))
        assert not dpair.pair_counters(torch.device(kdevice)).any()
    assert len(launches) == 6  # every call of _check_atomic_decode ran this form
    with override("infer", **plan):
        cfg = fi.get_config("infer")
        assert not fi._decode_plan(M, K, 300, cfg, capturing=True)["pairs"]
        assert not fi._decode_plan(2, K, 300, cfg)["pairs"]  # CUDA-core gate at M <= 2
        assert not fi._decode_plan(65, K, 300, cfg)["pairs"]
        torch.use_deterministic_algorithms(True)
        try:
            assert not fi._decode_plan(M, K, 300, fi.get_config("infer"))["pairs"]
        finally:
            torch.use_deterministic_algorithms(False)
    with override("infer", decode_pairs_min_k=4096):
        assert not fi._decode_plan(M, 4095, 300, fi.get_config("infer"))["pairs"]
        assert fi._decode_plan(16, 4096, 14336, fi.get_config("infer"))["pairs"]


@pytest.mark.parametrize(
    "M,K,up,chd,bkd,split,fin,pairs",
    [
        (3, 96, 8, 16, 32, 4, True, False),
        (8, 200, 4, 64, 64, 2, False, False),
        (17, 48, 2, 32, 16, 1, True, False),
        (33, 72, 4, 128, 128, 3, True, False),
        (33, 72, 4, 128, 128, 3, False, False),
        (3, 96, 8, 16, 32, 4, True, True),
        (17, 48, 2, 32, 16, 1, True, True),
        (33, 72, 4, 128, 128, 3, True, True),
        (33, 72, 4, 64, 64, 2, False, True),
    ],
)
def test_decode_pairs_units_variant(kdevice, poison, monkeypatch, M, K, up, chd, bkd, split, fin, pairs):
    # the pair form's units variant: the pair gate also lists the batch's active units (their
    # h rows zeroed), the pair up stores h by its unit's rank, then the union form's down GEMM
    # (`chd` ranks per tl.dot, `bkd` columns, `split` ranges, fp32 atomics) finishing the call
    # itself (`fin`) or followed by the finishing kernel; with `pairs` (M <=
    # decode_pairs_units_pair_down_max_m) the pair gate and up as in the pair form and the same
    # down GEMM over the pair list (`chd` pairs per one-hot tl.dot). Sparse, none active (no units
    # listed), every unit active (all 300 listed), a NaN token, calls after it (the counters back
    # at zero, the accumulator zeroed again)
    from twell.ops import decode_pairs as dpair
    from twell.ops import ffn_infer as fi

    # per call: whether the units variant ran (its `units` argument is given), and whether it ran
    # without h and units by rank (None: h in the pair list)
    launches = []
    fn = dpair.launch_decode_pairs
    monkeypatch.setattr(
        dpair,
        "launch_decode_pairs",
        lambda *a, units, **k: (
            launches.append((units is not None, units is not None and units[0] is None))
            or fn(*a, units=units, **k)
        ),
    )
    plan = dict(
        decode_union_finish=fin,
        decode_pairs_units_pair_down_max_m=64 if pairs else 0,
        decode_pairs_min_k=0,
        decode_pairs_units_min_m=1,
        decode_pairs_units_max_m=64,
        decode_pairs_up=up,
        decode_pairs_up_short=up,
        decode_pairs_up_bk=64,
        decode_union_chunk=chd,
        decode_union_short_chunk=chd,
        decode_union_bk=bkd,
        decode_union_short_bk=bkd,
        decode_union_split=split,
        decode_union_short_split=split,
    )
    with override("infer", **plan):
        p = fi._decode_plan(M, K, 300, fi.get_config("infer"))
        assert p["pairs"] and p["pairs_units"]
        _check_atomic_decode(kdevice, M, K, lambda active: max(K, active))
        assert not dpair.pair_counters(torch.device(kdevice)).any()
    assert launches == [(True, pairs)] * 6
    with override("infer", **plan):
        cfg = fi.get_config("infer")
        assert not fi._decode_plan(M, K, 300, cfg, capturing=True)["pairs_units"]
        assert not fi._decode_plan(65, K, 300, cfg)["pairs_units"]
    with override("infer", **{**plan, "decode_pairs_units_min_m": 0}):
        assert not fi._decode_plan(M, K, 300, fi.get_config("infer"))["pairs_units"]


def test_decode_pairs_default_range_and_down_blocks():
    # the defaults: M = 8..32 at K >= 4096, from decode_pairs_short_min_m = 21 at 2048 <= K < 4096
    # (the barrier form below), not below K = 2048; the down's (columns, column blocks, ranges)
    # by the last rule of decode_pairs_down that applies, decode_pairs_bkd / _split replacing them
    from twell.ops import ffn_infer as fi
    from twell.ops.decode_pairs import down_blocks

    cfg = fi.get_config("infer")
    plan = lambda M, K, N: fi._decode_plan(M, K, N, cfg, programs=132)  # noqa: E731
    assert [plan(M, 4096, 14336)["pairs"] for M in (4, 8, 32, 33)] == [False, True, True, False]
    assert [plan(M, 2048, 5632)["pairs"] for M in (8, 20, 21, 32, 33, 64)] == [False, False] + [True] * 4
    # its units variant at M = 33..64 below K = 4096 (the union form stays at K >= 4096)
    assert [plan(M, 2048, 5632)["pairs_units"] for M in (32, 33, 64)] == [False, True, True]
    assert not plan(48, 4096, 14336)["pairs_units"] and plan(48, 4096, 14336)["union"]
    assert not plan(48, 4096, 14336)["pairs"]
    assert plan(20, 2048, 5632)["barrier"]
    assert not plan(24, 896, 4864)["pairs"]
    assert down_blocks(24, 2048, cfg) == (64, 32, 2)
    assert down_blocks(24, 4096, cfg) == (16, 256, 1)
    assert down_blocks(32, 4096, cfg) == (32, 128, 2)
    assert down_blocks(8, 1000, cfg) == (16, 63, 1)
    with override("infer", decode_pairs_bkd=128, decode_pairs_split=3):
        assert down_blocks(24, 4096, fi.get_config("infer")) == (128, 32, 3)
    with override("infer", decode_pairs_bkd=100):
        assert down_blocks(8, 48, fi.get_config("infer")) == (64, 1, 1)  # a power of two <= K


@pytest.mark.parametrize(
    "M,K,chunk,split,progs",
    [(5, 48, 16, 3, 64), (3, 96, 16, 1, 0), (8, 40, 16, 3, 2), (20, 48, 32, 2, 0), (33, 40, 16, 1, 3)],
)
def test_decode_chunk_form(kdevice, poison, M, K, chunk, split, progs):
    # decode_chunk_min_m <= M <= decode_chunk_max_m: the gate kernel computes the gate only and
    # lists each block's active units; a second kernel compacts the batch's active units into
    # chunks and runs each chunk's up and down as tl.dot tiles (the down columns split in at most
    # `split` ranges and at most programs / chunks, over `progs` programs, 0: one per SM; with
    # 64 programs each range is one 16-column step, loaded before the up loop). Sparse, none
    # active, every unit active, a NaN token, repeated calls on the reused accumulator
    from twell.ops import ffn_infer as fi

    plan = dict(
        decode_chunk_min_m=1,
        decode_chunk_max_m=64,
        decode_chunk_units=chunk,
        decode_chunk_split=split,
        decode_chunk_programs=progs,
        decode_chunk_bk=16,
        decode_atomic_bk=16,
    )
    with override("infer", **plan):
        p = fi._decode_plan(M, K, 300, fi.get_config("infer"))
        assert p["chunk"] and p["atomic"] and not p["compact"] and not p["units"]
        assert not fi._decode_plan(M, K, 300, fi.get_config("infer"), capturing=True)["chunk"]
        assert not fi._decode_plan(2, K, 300, fi.get_config("infer"))["chunk"]  # CUDA-core gate at M <= 2
        with override("infer", decode_chunk_max_m=M - 1, decode_chunk_long_k=K + 1):
            assert not fi._decode_plan(M, K, 300, fi.get_config("infer"))["chunk"]
        with override("infer", decode_chunk_max_m=M - 1, decode_chunk_long_k=K, decode_chunk_long_max_m=M):
            assert fi._decode_plan(M, K, 300, fi.get_config("infer"))["chunk"]
        # K-term dot products summed in another order than torch's, and each chunk's sums
        # reaching the accumulator by atomics in arrival order
        _check_atomic_decode(kdevice, M, K, lambda active: max(K, active))


@pytest.mark.parametrize("M,K,nacc,union", [(6, 200, 4, False), (13, 40, 2, False), (16, 96, 4, True)])
def test_decode_chunk_up_accumulators(kdevice, poison, M, K, nacc, union):
    # the chunk kernel's up loop with nacc accumulators (each over its own K slice of a 64-column
    # step; K = 40 and 200 end in a partial step) in the chunk and union forms; one accumulator
    # from 17 token rows on (decode_chunk_up_nacc_max_m = 16)
    from twell.ops import ffn_infer as fi

    plan = dict(decode_chunk_min_m=1, decode_chunk_max_m=64, decode_chunk_bk=64, decode_chunk_up_nacc=nacc)
    if union:
        plan.update(
            decode_chunk_max_m=0, decode_union_min_m=3, decode_union_min_k=0, decode_union_up_bk=64,
            decode_chunk_long_max_m=0, decode_barrier_max_m=0,
        )  # fmt: skip
    with override("infer", **plan):
        cfg = fi.get_config("infer")
        p = fi._decode_plan(M, K, 300, cfg)
        assert p["chunk"] and p["union"] == union
        assert p["nacc_chunk"] == nacc
        assert fi._decode_plan(17, K, 300, cfg)["nacc_chunk"] == 1
        _check_atomic_decode(kdevice, M, K, lambda active: max(K, active))


@pytest.mark.parametrize(
    "M,K,bk,chd,split,progs,fin,pad",
    [
        (20, 48, 16, 16, 0, 0, True, False),
        (33, 40, 32, 32, 3, 0, True, False),
        (33, 40, 32, 32, 3, 0, False, False),
        (7, 96, 64, 16, 1, 5, False, False),
        (60, 40, 16, 64, 2, 0, True, False),
        (128, 40, 32, 32, 8, 0, True, False),
        (20, 48, 16, 16, 0, 0, True, True),
        (33, 40, 32, 32, 3, 0, False, True),
    ],
)
def test_decode_union_form(kdevice, poison, M, K, bk, chd, split, progs, fin, pad):
    # decode_union_min_m <= M <= decode_union_max_m: the chunk kernel stores h of the batch's
    # compacted active units and their unit ids, and a third kernel runs y = h W_down^T over them
    # split in bk-column blocks x `split` ranges of units (0: programs / blocks), chd units per
    # tl.dot, one atomic add per program; `fin`: that kernel also rounds y (the last range of
    # each column block behind a ticket) and reduces the statistics, else a finishing kernel
    # does. Sparse, none active, every unit active, a NaN token, repeated calls on the reused
    # accumulator; deterministic mode and capture keep it off. `pad`: h rows of M rounded up to 16
    # values (decode_union_h_pad), loaded whole
    from twell.ops import ffn_infer as fi

    plan = dict(
        decode_union_finish=fin,
        decode_union_h_pad=pad,
        decode_union_min_m=3,
        decode_union_max_m=128,
        decode_union_min_k=0,
        decode_chunk_max_m=0,
        decode_chunk_long_max_m=0,
        decode_union_bk=bk,
        decode_union_short_bk=bk,
        decode_union_chunk=chd,
        decode_union_split=split,
        # these K are below decode_chunk_long_k: the short-K choices apply, with a 16-column gate
        # K step (several steps at every K here)
        decode_union_short_chunk=chd,
        decode_union_short_split=split,
        decode_union_short_gate_bk=16,
        decode_chunk_programs=progs,
        decode_union_up_bk=16,
        decode_barrier_max_m=0,  # (it would take M = 8..20)
    )
    with override("infer", **plan):
        cfg = fi.get_config("infer")
        p = fi._decode_plan(M, K, 300, cfg)
        assert p["union"] and p["chunk"] and p["atomic"] and not p["compact"] and not p["units"]
        assert p["split_chunk"] == 1  # the chunk kernel runs each chunk's up once
        # (split 0: the rule table's ranges below decode_chunk_long_k, all these K)
        want = (bk, -(-K // bk), split or (16 if M < 48 else 8), max(16, chd))
        assert p["bk"] == 16 and p["union_down"] == want
        assert not fi._decode_plan(M, K, 300, cfg, capturing=True)["union"]
        assert not fi._decode_plan(2, K, 300, cfg)["union"]  # CUDA-core gate at M <= 2
        with override("infer", decode_union_max_m=M - 1):
            assert not fi._decode_plan(M, K, 300, fi.get_config("infer"))["union"]
        with override("infer", decode_union_min_k=K + 1):
            assert not fi._decode_plan(M, K, 300, fi.get_config("infer"))["union"]
        # K-term dot products summed in another order than torch's, and each program's sums
        # reaching the accumulator by atomics in arrival order
        _check_atomic_decode(kdevice, M, K, lambda active: max(K, active))


def test_decode_plan_compact_and_warps():
    # the unit form up to decode_units_max_m tokens; the chunk form from decode_chunk_min_m to
    # decode_chunk_max_m (decode_chunk_long_max_m at K >= decode_chunk_long_k), its down split in
    # 64 / M column ranges and its W_up loop in K / 8 steps; the atomic tl.dot form compacts up to
    # decode_atomic_compact_max_m tokens (off with decode_atomic_compact=False); 64 token rows
    # take decode_warps_m64 warps; the union form (chunk kernel, then a split down GEMM) from
    # decode_union_min_m to decode_union_max_m at K >= decode_union_min_k, with its own down
    # tiles and gate K step / stages below decode_chunk_long_k
    from twell.ops import ffn_infer as fi

    cfg = fi.get_config("infer")
    assert fi._decode_plan(4, 4096, 14336, cfg)["units"]
    assert not fi._decode_plan(8, 4096, 14336, cfg)["units"]
    for M, K, chunk in (
        (5, 2048, True),
        (7, 2048, True),
        (8, 2048, False),
        (16, 4096, True),
        (17, 1024, False),
    ):
        p = fi._decode_plan(M, K, 14336, cfg)
        assert p["chunk"] == chunk and p["compact"] == (not chunk and M <= 16), (M, K)
    p = fi._decode_plan(6, 4096, 14336, cfg)
    assert (p["split_chunk"], p["bk_chunk"], p["stages_chunk"]) == (8, 512, 5)
    assert fi._decode_plan(6, 2048, 5632, cfg)["stages_chunk"] == 4
    with override("infer", decode_chunk_max_m=0, decode_chunk_long_max_m=0):
        assert fi._decode_plan(8, 4096, 14336, fi.get_config("infer"))["compact"]
    # M = 17..32 at K >= 4096 only with a measured density whose expected union of active units
    # fits one 16-unit chunk per program (30 per token: ~930 units at M = 32; 100: ~2,900)
    with override("infer", decode_union_max_m=0):
        assert not fi._decode_plan(24, 4096, 14336, fi.get_config("infer"))["chunk"]
    assert fi._decode_plan(24, 4096, 14336, cfg, active=30.0, programs=132)["chunk"]
    # the union form from M = 17 to 128 at K >= 2048 where the chunk form is not chosen
    for M, K, union in (
        (16, 4096, False),
        (17, 4096, True),
        (48, 4096, True),
        (64, 4096, True),
        (128, 4096, True),
        (48, 2048, True),
    ):
        p = fi._decode_plan(M, K, 14336, cfg)
        assert p["union"] == union and p["chunk"] == (union or M <= 16) and not p["compact"], (M, K)
    assert not fi._decode_plan(16, 2048, 5632, cfg)["union"]
    assert not fi._decode_plan(48, 1024, 4864, cfg)["union"]
    assert not fi._decode_plan(24, 4096, 14336, cfg, active=30.0, programs=132)["union"]
    assert fi._decode_plan(32, 4096, 14336, cfg, active=30.0, programs=132)["chunk"]
    # past the chunk form's reach (more active units, more tokens), the union form
    assert fi._decode_plan(32, 4096, 14336, cfg, active=100.0, programs=132)["union"]
    assert fi._decode_plan(33, 4096, 14336, cfg, active=30.0, programs=132)["union"]
    p = fi._decode_plan(24, 2048, 5632, cfg, active=30.0, programs=132)
    assert p["union"] and p["chunk"]  # (the chunk form reaches 16 tokens at K >= 4096 only)
    # below decode_chunk_long_k: 128 units per tl.dot, 16 unit ranges of 128-column blocks below
    # M = 48, 8 ranges of 64 columns at M = 48 and 8 of 32 columns from M = 49
    # (decode_union_short_down), the gate in 128-column K steps with 5 stages (its up K step is
    # unused there); the long-K choices at K = 4096
    for M, K, want in (
        (24, 2048, ((128, 16, 16, 128), 128, 5)),
        (48, 2048, ((64, 32, 8, 128), 128, 5)),
        (56, 2048, ((32, 64, 8, 128), 128, 5)),
        (64, 2048, ((32, 64, 8, 128), 128, 5)),
        (64, 4096, ((128, 32, 8, 32), 128, 3)),
        (48, 4096, ((128, 32, 8, 32), 128, 3)),
    ):
        p = fi._decode_plan(M, K, 14336, cfg, programs=132)
        assert (p["union_down"], p["bk"], p["stages"]) == want, (M, K)
    # the gate's K step is kept to decode_tile_elems x elements: 256 columns at 64 rows with 16384,
    # and then 3 stages of [128, 256] bf16 tiles in 192 KiB
    with override("infer", decode_tile_elems=16384, decode_union_short_gate_bk=256):
        p = fi._decode_plan(64, 2048, 5632, fi.get_config("infer"))
        assert (p["bk"], p["stages"]) == (256, 3)
    # M = 8..16 on the paper shape: the barrier form (one launch) in place of the compact form,
    # and of the union form at 17..20
    assert (
        fi._decode_plan(16, 2048, 5632, cfg)["barrier"]
        and not fi._decode_plan(16, 2048, 5632, cfg)["compact"]
    )
    p = fi._decode_plan(20, 2048, 5632, cfg)
    assert p["barrier"] and not p["union"] and not p["chunk"] and not p["atomic"]
    # its gate loop in 128-column K steps with 5 stages (decode_barrier_gate_*; 0: the tl.dot
    # forms' K step, capped by the shared memory of the up tiles' K step too)
    assert (p["bk"], p["stages"]) == (128, 5)
    with override("infer", decode_barrier_gate_bk=0, decode_barrier_gate_stages=0):
        p = fi._decode_plan(8, 2048, 5632, fi.get_config("infer"))
        assert p["barrier"] and (p["bk"], p["stages"]) == (256, 4)
    assert fi._decode_plan(21, 2048, 5632, cfg)["union"]
    with override("infer", decode_barrier_max_m=0):
        assert fi._decode_plan(20, 2048, 5632, fi.get_config("infer"))["union"]
    # below decode_union_min_k (Qwen2-0.5B shape) to decode_barrier_max_m only
    assert fi._decode_plan(16, 896, 4864, cfg)["barrier"]
    p = fi._decode_plan(20, 896, 4864, cfg)
    assert not p["barrier"] and p["atomic"] and not p["union"]
    with override("infer", decode_barrier_max_m=0):
        assert fi._decode_plan(16, 2048, 5632, fi.get_config("infer"))["compact"]
    # not where its programs would not all be resident at once (224 of 64 units here)
    assert not fi._decode_plan(16, 4096, 14336, cfg, programs=132)["barrier"]
    assert not fi._decode_plan(32, 4096, 14336, cfg)["compact"]
    assert fi._decode_plan(64, 2048, 5632, cfg)["warps"] == cfg.decode_warps_m64
    assert fi._decode_plan(32, 2048, 5632, cfg)["warps"] == cfg.decode_warps
    with override("infer", decode_atomic_compact=False, decode_units_max_m=0, decode_chunk_long_max_m=0):
        cfg = fi.get_config("infer")
        p = fi._decode_plan(8, 4096, 14336, cfg)
        assert p["atomic"] and not p["compact"] and not p["units"] and not p["chunk"]


@pytest.mark.parametrize("bn,warps", [(2, 4), (4, 2), (8, 8)])
def test_decode_gemv_blocks(kdevice, poison, bn, warps):
    # units and warps per program of the GEMV form (defaults pick them by K), M = 1 and 2
    from twell.ops import ffn_infer as fi

    assert fi._decode_plan(1, 4096, 300, fi.get_config("infer"))["bn"] == 2
    assert fi._decode_plan(2, 896, 300, fi.get_config("infer"))["warps"] == 2
    for M in (1, 2):
        x, wg, wu, wd = make_sparse_ffn(M, 40, 300, 12, device=kdevice, seed=M + bn)
        with override("infer", decode_bn_gemv=bn, decode_gemv_warps=warps):
            _check(x, wg, wu, wd, 64, 8, "decode")


def test_decode_atomic_down_off_when_deterministic_or_capturing():
    from twell.ops import ffn_infer as fi

    # by default the CUDA-core form at M <= 2, the unit form at M = 3..4, the chunk form at 5..7,
    # the barrier form at 8..16 and the tl.dot atomic form above; the split form at 5..7 without
    # the chunk form
    cfg = fi.get_config("infer")
    assert cfg.decode_atomic_max_m == 2 and cfg.decode_units_max_m == 4 and cfg.decode_atomic_dot_min_m == 8
    assert fi._decode_plan(6, 64, 300, cfg)["chunk"] and fi._decode_plan(6, 64, 300, cfg)["atomic"]
    assert not fi._decode_plan(6, 64, 300, cfg, capturing=True)["atomic"]
    with override("infer", decode_chunk_max_m=0):
        assert not fi._decode_plan(6, 64, 300, fi.get_config("infer"))["atomic"]
    assert fi._decode_plan(1, 64, 300, cfg)["atomic"] and fi._decode_plan(16, 64, 300, cfg)["barrier"]
    assert fi._decode_plan(4, 64, 300, cfg)["units"] and fi._decode_plan(4, 64, 300, cfg)["atomic"]
    assert not fi._decode_plan(4, 64, 300, cfg, capturing=True)["units"]
    with override("infer", decode_units_max_m=0):
        assert not fi._decode_plan(4, 64, 300, fi.get_config("infer"))["atomic"]
    with override("infer", decode_barrier_max_m=0):
        assert fi._decode_plan(16, 64, 300, fi.get_config("infer"))["compact"]
    assert not fi._decode_plan(32, 64, 300, cfg)["compact"]
    assert fi._decode_plan(32, 64, 300, cfg)["atomic"]
    # into a CUDA graph being captured: the split down kernel (no zero fill in the graph)
    assert not fi._decode_plan(1, 64, 300, cfg, capturing=True)["atomic"]
    assert not fi._decode_plan(16, 64, 300, cfg, capturing=True)["barrier"]
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not fi._decode_plan(1, 64, 300, cfg)["atomic"]
        assert not fi._decode_plan(4, 64, 300, cfg)["atomic"]
        assert not fi._decode_plan(6, 64, 300, cfg)["atomic"]
        assert not fi._decode_plan(16, 64, 300, cfg)["atomic"]
        assert not fi._decode_plan(16, 64, 300, cfg)["barrier"]
    finally:
        torch.use_deterministic_algorithms(was)


def test_decode_compile_failure_falls_back_to_dense(kdevice, monkeypatch):
    # a decode kernel that does not compile on some install: warned once, the dense path answers
    from triton.compiler.errors import CompilationError

    from twell.ops import ffn_infer as fi

    def broken(*args, **kwargs):
        raise CompilationError("src", None, "boom")

    monkeypatch.setattr(fi, "_decode", broken)
    monkeypatch.setattr(fi, "_BROKEN", {})
    x, wg, wu, wd = make_sparse_ffn(2, 16, 40, 4, device=kdevice, seed=11)
    with pytest.warns(RuntimeWarning, match="decode kernels failed to compile"):
        _check(x, wg, wu, wd, 16, 4, "decode")
    assert "boom" in fi._BROKEN["decode"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second attempt, so no second warning
        _check(x, wg, wu, wd, 16, 4, "decode")
