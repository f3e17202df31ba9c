"""GPU-only tests of the inference kernels: bf16/fp16 at model shapes, CUDA graphs, opcheck,
torch.compile. Run on the H100 with ``pytest -m gpu tests/test_infer_gpu.py``."""

import contextlib

import pytest
import torch

from twell.format import TwELL
from twell.ops import gate_pack as gp_mod
from twell.ops.configs import override
from twell.ops.ffn_infer import ffn_infer
from twell.ops.ffn_ref import sparse_ffn_ref
from twell.ops.gate_pack import gate_pack
from twell.testing import assert_close, make_sparse_ffn

pytestmark = pytest.mark.gpu

SHAPES = {"paper": (2048, 5632), "llama3-8b": (4096, 14336), "qwen2-0.5b": (896, 4864)}


def _inputs(M, K, N, active, dtype, pattern="iid", seed=0):
    return make_sparse_ffn(M, K, N, active, pattern=pattern, dtype=dtype, device="cuda", seed=seed)


def _path(path):
    """(ffn_infer path, config context): "prefill-tiles" is the prefill through gate_pack and the
    per-token up/down over TwELL (InferConfig.prefill_rows off)."""
    if path == "prefill-tiles":
        return "prefill", override("infer", prefill_rows=False)
    return path, contextlib.nullcontext()


def _ref(x, wg, wu, wd, tile=256, slots=32):
    with torch.no_grad():
        y32, st = sparse_ffn_ref(x.float(), wg.float(), wu.float(), wd.float(), tile=tile, slots=slots)
        y_t, _ = sparse_ffn_ref(x, wg, wu, wd, tile=tile, slots=slots)
    return y32, st, y_t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ["paper", "llama3-8b"])
@pytest.mark.parametrize("M", [1, 8, 64, 300, 2048])
def test_paths_bf16_fp16_model_shapes(dtype, shape, M):
    K, N = SHAPES[shape]
    x, wg, wu, wd = _inputs(M, K, N, 30, dtype, seed=M)
    y32, sr, y_t = _ref(x, wg, wu, wd)
    for path in ("prefill", "prefill-tiles", "decode", "dense", "auto"):
        if path == "decode" and M > 64:
            continue
        run, ctx = _path(path)
        with ctx:
            y, st = ffn_infer(x, wg, wu, wd, path=run)
        assert_close(y.float(), y32, name=f"y[{path}, {shape}, M={M}]", dtype=dtype, baseline=y_t.float())
        assert int(st.overflow_rows) == int(sr.overflow_rows), f"overflow_rows[{path}]"
        # l0 from the kernels' own gate (rounding may flip a unit sitting at 0)
        assert abs(float(st.l0) - float(sr.l0)) <= 0.01 * float(sr.l0) + 0.05, f"l0[{path}]"
        assert float(st.l1) == pytest.approx(float(sr.l1), rel=2e-2), f"l1[{path}]"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ["paper", "llama3-8b", "qwen2-0.5b"])
@pytest.mark.parametrize("M", [1, 2, 4, 6, 8, 16, 32, 64, 128])
@pytest.mark.parametrize("form", ["default", "chunk", "union", "pairs", "units"])
def test_decode_atomic_down_model_shapes(dtype, shape, M, form):
    # the up/down of the active units adds into an fp32 accumulator (atomics): in the gate
    # programs on CUDA cores at M <= 2, in a second kernel over all SMs at M = 3..4 (unit form),
    # in the gate programs' tl.dot loops from 8 (compacting the active units up to 16 tokens),
    # or in a second kernel (chunk form: by default at M = 5..7, to 16 at K >= 4096; at 5..32
    # with `chunk`), or the chunk kernel's up and a split down GEMM over the batch's active units
    # (union form: by default at M = 33..128 and K >= 4096; at 8..128 on every shape with `union`);
    # the union down kernel or the finishing kernel rounds it into y and zeroes it
    from twell.ops.configs import override

    plans = {
        "default": {},
        "chunk": {"decode_chunk_max_m": 32, "decode_chunk_long_max_m": 32, "decode_pairs_max_m": 0},
        "union": {
            "decode_chunk_max_m": 0,
            "decode_chunk_long_max_m": 0,
            "decode_union_min_m": 8,
            "decode_union_max_m": 128,
            "decode_union_min_k": 0,
            "decode_barrier_max_m": 0,  # (it would take M = 8..20 where its programs fit)
            "decode_pairs_max_m": 0,
            "decode_pairs_units_min_m": 0,
        },
        # the pair form (by default at M = 8..32 and K >= 4096, 21..32 at 2048 <= K < 4096) on
        # every shape to 128 tokens
        "pairs": {
            "decode_pairs_min_m": 3,
            "decode_pairs_max_m": 128,
            "decode_pairs_min_k": 0,
            "decode_pairs_short_min_m": 0,
        },
        # the pair form's units variant (by default at M = 33..64 and 2048 <= K < 4096) on every
        # shape to 128 tokens
        "units": {
            "decode_pairs_units_min_m": 3,
            "decode_pairs_units_max_m": 128,
            "decode_pairs_min_k": 0,
            "decode_chunk_long_k": 1 << 20,
        },
    }
    if M > 64 and form == "default" and shape != "llama3-8b":
        pytest.skip("decode runs M > 64 in the union form only (K >= 4096 by default)")
    if (form == "chunk" and not 5 <= M <= 32) or (form in ("union", "pairs", "units") and M < 8):
        pytest.skip(f"the {form} form is switched on at M = {'5..32' if form == 'chunk' else '8..128'} here")
    with override("infer", **plans[form]):
        _check_atomic_model_shape(dtype, shape, M)


def _check_atomic_model_shape(dtype, shape, M):
    K, N = SHAPES[shape]
    x, wg, wu, wd = _inputs(M, K, N, 30, dtype, seed=M + 11)
    x[M - 1, 0] = -40.0  # one token with every unit active
    y32, sr, y_t = _ref(x, wg, wu, wd)
    for _ in range(2):  # the second call reuses the accumulator the first one zeroed
        y, st = ffn_infer(x, wg, wu, wd, path="decode")
        assert_close(y.float(), y32, name=f"y[{shape}, M={M}]", dtype=dtype, baseline=y_t.float())
        assert int(st.overflow_rows) == int(sr.overflow_rows)
        assert float(st.l1) == pytest.approx(float(sr.l1), rel=2e-2)


@pytest.mark.parametrize(
    "M,plan",
    [
        (1, {}),
        (2, {}),
        (4, {}),
        (8, {"decode_units_max_m": 8, "decode_chunk_long_max_m": 0, "decode_pairs_max_m": 0}),
        (8, {"decode_pairs_max_m": 0}),
        (8, {"decode_chunk_long_max_m": 0, "decode_pairs_max_m": 0}),
        (
            8,
            {
                "decode_units_max_m": 0,
                "decode_chunk_long_max_m": 0,
                "decode_atomic_compact": False,
                "decode_pairs_max_m": 0,
            },
        ),
        (8, {}),
        (16, {"decode_chunk_long_max_m": 0, "decode_pairs_max_m": 0}),
        (16, {"decode_pairs_max_m": 0}),
        (16, {"decode_chunk_split": 1, "decode_pairs_max_m": 0}),
        (16, {}),
        (32, {"decode_pairs_max_m": 0}),
        (32, {}),
        (48, {}),
        (64, {}),
        (128, {}),
    ],
    ids=[
        "1",
        "2",
        "4-units",
        "8-units",
        "8-chunk",
        "8-compact",
        "8-tiles",
        "8-pairs",
        "16-compact",
        "16-chunk",
        "16-chunk-s1",
        "16-pairs",
        "32",
        "32-pairs",
        "48-union",
        "64-union",
        "128-union",
    ],
)
def test_decode_fully_active_token_repeats(M, plan):
    # every decode form on one input 250 times back to back, with a token that has all 14,336
    # units active; checked after the last call. Before the barrier in _decode_finish_kernel,
    # 1-13 of 250 such calls at M = 8 came back with whole 128-column blocks of that token's row
    # at 0 (the kernel's zeroing of the accumulator raced its reads)
    _repeat_fully_active("llama3-8b", M, plan)


@pytest.mark.parametrize("M", [8, 12, 16, 20])
def test_decode_barrier_fully_active_repeats(M):
    # the barrier form on the paper shape (one launch: gate + up, a grid-wide barrier, the down
    # by column blocks straight into y), 250 calls with a token that has all 5,632 units active
    # (the list of active units holds them all); its counters are back at 0 after every launch
    from twell.ops import ffn_infer as fi
    from twell.ops.decode_barrier import barrier_counters

    K, N = SHAPES["paper"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert fi._decode_plan(M, K, N, fi.get_config("infer"), programs=sms)["barrier"]
    _repeat_fully_active("paper", M, {})
    assert not barrier_counters(torch.device("cuda", torch.cuda.current_device())).any()


@pytest.mark.parametrize(
    "shape,M", [("llama3-8b", 8), ("llama3-8b", 24), ("llama3-8b", 32), ("paper", 21), ("paper", 32)]
)
def test_decode_pairs_fully_active_repeats(shape, M):
    # the pair form in its default range (M = 8..32 at K >= 4096, 21..32 on the paper shape, whose
    # down splits the list in 2 ranges per column block, as Llama-3-8B's does at M = 32), 250
    # calls with a token that has every unit active (all N of its pairs in the list); the pair
    # count is back at 0 after every call
    from twell.ops import ffn_infer as fi
    from twell.ops.decode_pairs import pair_counters

    K, N = SHAPES[shape]
    assert fi._decode_plan(M, K, N, fi.get_config("infer"))["pairs"]
    _repeat_fully_active(shape, M, {})
    assert not pair_counters(torch.device("cuda", torch.cuda.current_device())).any()


@pytest.mark.parametrize("M", [40, 48, 64])
@pytest.mark.parametrize("fin", [True, False])
def test_decode_union_short_k_fully_active_repeats(M, fin):
    # the union form on the paper shape (K below decode_chunk_long_k: 128 units per tl.dot, 8
    # unit ranges of 32-column blocks from M = 48, the gate in 128-column K steps; the pair
    # form's units variant off), 250 calls
    # with a token that has all 5,632 units active, the down kernel finishing the call (`fin`,
    # tickets per column block) or the finishing kernel after it
    from twell.ops import ffn_infer as fi
    from twell.ops.configs import override

    K, N = SHAPES["paper"]
    plan = {"decode_pairs_units_min_m": 0, "decode_union_finish": fin}
    with override("infer", **plan):
        p = fi._decode_plan(M, K, N, fi.get_config("infer"))
        assert p["union"] and not p["pairs"]
    _repeat_fully_active("paper", M, plan)


@pytest.mark.parametrize("M", [33, 48, 64])
def test_decode_pairs_units_fully_active_repeats(M):
    # the pair form's units variant in its default range (paper shape, M = 33..64), 250 calls with
    # a token that has all 5,632 units active (every unit listed, all of its pairs); the counters
    # are back at 0 after every call
    from twell.ops import ffn_infer as fi
    from twell.ops.decode_pairs import pair_counters

    K, N = SHAPES["paper"]
    assert fi._decode_plan(M, K, N, fi.get_config("infer"))["pairs_units"]
    _repeat_fully_active("paper", M, {})
    assert not pair_counters(torch.device("cuda", torch.cuda.current_device())).any()


@pytest.mark.parametrize(
    "shape,M,plan",
    [
        ("paper", 1, {}),
        ("paper", 8, {}),
        ("paper", 24, {}),
        ("paper", 40, {}),
        ("paper", 64, {}),
        ("paper", 64, {"decode_union_finish": False}),
        ("llama3-8b", 64, {}),
        ("paper", 4, None),
    ],
)
def test_decode_density_host_slot(shape, M, plan):
    # every decode form's statistics kernel stores l0 into the weight's pinned host slot too: after
    # the calls the slot holds the l0 the call returned, the dispatcher reads its estimate there, and
    # no device-to-host copy (event) was queued. plan None: deterministic mode (the split form)
    from twell.ops import ffn_infer as fi

    K, N = SHAPES[shape]
    x, wg, wu, wd = _inputs(M, K, N, 30, torch.bfloat16, seed=M + 5)
    det = contextlib.ExitStack()
    if plan is None:
        torch.use_deterministic_algorithms(True)
        det.callback(torch.use_deterministic_algorithms, False)
    with det, override("infer", **(plan or {})):
        for _ in range(3):
            _, st = ffn_infer(x, wg, wu, wd, path="decode")
        torch.cuda.synchronize()
        d = fi._density_entry(wg)
        assert d.event is None
        assert d.slot is not None and d.slot.data_ptr() % 16 == 0
        assert d.slot.item() == st.l0.item() > 0.0
        fi._poll(d)  # (the 3 calls: not a multiple of density_every; the first call set the estimate)
        assert d.est is not None and 0.0 < d.est
        with override("infer", density_host_store=False, density_every=1):
            ffn_infer(x, wg, wu, wd, path="decode")
        assert d.event is not None  # the copy measures instead


def _repeat_fully_active(shape, M, plan):
    from twell.ops.configs import override

    K, N = SHAPES[shape]
    x, wg, wu, wd = _inputs(M, K, N, 30, torch.bfloat16, seed=M + 11)
    x[M - 1, 0] = -40.0
    y32, _, y_t = _ref(x, wg, wu, wd)
    with override("infer", **plan):
        ys = [ffn_infer(x, wg, wu, wd, path="decode")[0] for _ in range(250)]
    for i, y in enumerate(ys):
        assert_close(y.float(), y32, name=f"y[M={M}, call {i}]", dtype=torch.bfloat16, baseline=y_t.float())


def _check_fp32_decode(shape, M, seed, name):
    # reduce=K: each gate and up value is a K-term fp32 sum (the kernels' sums run in another order
    # than cuBLAS's; measured ~4e-6 relative at M = 8 and 16 for every decode form, torch 7e-7)
    K, N = SHAPES[shape]
    x, wg, wu, wd = _inputs(M, K, N, 30, torch.float32, seed=seed)
    y, _ = ffn_infer(x, wg, wu, wd, path="decode")
    with torch.no_grad():
        y64, _ = sparse_ffn_ref(x.double(), wg.double(), wu.double(), wd.double())
        y_t, _ = sparse_ffn_ref(x, wg, wu, wd)
    assert_close(
        y.double(), y64, name=f"y[fp32 {name}, M={M}]", dtype=torch.float32, baseline=y_t.double(), reduce=K
    )


@pytest.mark.parametrize("M", [1, 8, 32, 64, 128])
def test_decode_fp32_model_shape(M):
    # fp32 tiles take twice the shared memory: the plan lowers the pipeline stages to fit
    _check_fp32_decode("paper", M, M + 9, "decode")


@pytest.mark.parametrize("M", [8, 32])
def test_decode_pairs_fp32_llama(M):
    # the pair form in fp32 (Llama-3-8B shape, its default range): the up kernel's whole-row tiles
    # are halved to [8, 2048] to stay in registers, so each step runs two K slices
    from twell.ops import ffn_infer as fi

    K, N = SHAPES["llama3-8b"]
    assert fi._decode_plan(M, K, N, fi.get_config("infer"), elsize=4)["pairs"]
    _check_fp32_decode("llama3-8b", M, M + 3, "pairs")


@pytest.mark.parametrize("M", [1, 8, 32])
def test_decode_deterministic_mode_repeats_bitwise(M):
    # torch.use_deterministic_algorithms(True): the split down kernel (fixed summation order)
    # instead of the atomic form, so repeated calls agree bit for bit
    K, N = SHAPES["paper"]
    x, wg, wu, wd = _inputs(M, K, N, 30, torch.bfloat16, seed=M + 5)
    y32, _, y_t = _ref(x, wg, wu, wd)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        ys = [ffn_infer(x, wg, wu, wd, path="decode")[0] for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(was)
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    assert_close(
        ys[0].float(), y32, name=f"y[deterministic, M={M}]", dtype=torch.bfloat16, baseline=y_t.float()
    )


@pytest.mark.parametrize("pattern", ["skewed", "heavy"])
@pytest.mark.parametrize("M", [8, 1024])
def test_patterns_with_overflow_bf16(pattern, M):
    K, N = SHAPES["paper"]
    x, wg, wu, wd = _inputs(M, K, N, 39, torch.bfloat16, pattern=pattern, seed=3)
    x[M // 2, 0] = -20.0  # one token with every unit active: all its tiles overflow
    y32, sr, y_t = _ref(x, wg, wu, wd)
    for path in ("prefill", "prefill-tiles", "decode", "dense"):
        if path == "decode" and M > 64:
            continue
        run, ctx = _path(path)
        with ctx:
            y, st = ffn_infer(x, wg, wu, wd, path=run)
        assert_close(y.float(), y32, name=f"y[{path}, {pattern}]", dtype=torch.bfloat16, baseline=y_t.float())
        assert int(st.overflow_rows) == int(sr.overflow_rows) >= 1


def test_prefill_rows_two_chunks_bf16():
    # 17000 tokens: two rows_forward calls (16384 + 616) into one y, statistics combined
    K, N = SHAPES["paper"]
    x, wg, wu, wd = _inputs(17000, K, N, 30, torch.bfloat16, seed=9)
    x[16500, 0] = -20.0  # a token of the second chunk with every unit active
    y32, sr, y_t = _ref(x, wg, wu, wd)
    y, st = ffn_infer(x, wg, wu, wd, path="prefill", unit_counts=True)
    assert_close(y.float(), y32, name="y", dtype=torch.bfloat16, baseline=y_t.float())
    assert int(st.overflow_rows) == int(sr.overflow_rows) >= 1
    assert abs(float(st.l0) - float(sr.l0)) <= 0.01 * float(sr.l0) + 0.05
    assert float(st.l1) == pytest.approx(float(sr.l1), rel=2e-2)
    assert abs(int(st.unit_counts.sum()) - float(st.l0) * 17000) <= 2


@pytest.mark.parametrize("path", ["prefill", "prefill-tiles", "decode", "dense"])
def test_nan_token_bf16(path):
    K, N = SHAPES["paper"]
    x, wg, wu, wd = _inputs(16, K, N, 30, torch.bfloat16)
    x[5, 100] = float("nan")
    run, ctx = _path(path)
    with ctx:
        y, _ = ffn_infer(x, wg, wu, wd, path=run)
    assert torch.isnan(y[5]).all()
    rows = [i for i in range(16) if i != 5]
    assert not torch.isnan(y[rows]).any()
    y32, _, y_t = _ref(x[rows], wg, wu, wd)
    assert_close(y[rows].float(), y32, name="y", dtype=torch.bfloat16, baseline=y_t.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 100, 4096])
def test_gate_pack_gpu(dtype, M):
    K, N = SHAPES["paper"]
    x, wg, _, _ = _inputs(M, K, N, 30, dtype, seed=1)
    P = gate_pack(x, wg)
    g = torch.nn.functional.linear(x.float(), wg.float())
    R = TwELL.from_dense(torch.relu(g).to(dtype), 256, 32, keep_overflow=False)
    # the two GEMMs round differently: only units within rounding of 0 may flip
    assert (P.counts - R.counts).abs().sum() <= max(4, M * N // 200000)
    same = torch.equal(P.counts, R.counts)
    used = torch.arange(32, device="cuda").view(1, 1, 32) < P.counts.clamp(max=32).unsqueeze(-1)
    if same:
        assert torch.equal(P.columns[used], R.columns[used])
    vals = P.values[used].float()
    assert (vals > 0).all() or torch.isnan(vals).any()
    assert not gp_mod._BROKEN, f"kernel variants that failed to compile: {gp_mod._BROKEN}"


def _same_packing(P, Q):
    assert torch.equal(P[0], Q[0]), "counts"
    used = torch.arange(Q[1].shape[-1], device="cuda").view(1, 1, -1) < Q[0].clamp(
        max=Q[1].shape[-1]
    ).unsqueeze(-1)
    assert torch.equal(P[2][used], Q[2][used]), "columns"
    assert torch.equal(P[1][used].view(torch.int16), Q[1][used].view(torch.int16)), "values"


def test_gate_pack_tma_vs_plain_bitexact():
    from twell.ops.configs import override

    K, N = SHAPES["paper"]
    x, wg, _, _ = _inputs(3000, K, N, 30, torch.bfloat16, seed=2)
    P1 = gate_pack(x, wg)  # the specialised-warps kernel on Hopper
    with override("gate", use_ws="never"):
        P4 = gate_pack(x, wg)
        with override("gate", use_tma="never"):
            P2 = gate_pack(x, wg)
        with override("gate", use_asm_store=False):
            P3 = gate_pack(x, wg)
    for P in (P2, P3, P4):
        _same_packing((P1.counts, P1.values, P1.columns), (P.counts, P.values, P.columns))


def _launch_pack(x, wg, ucounts, **over):
    from twell.ops.configs import override

    M, N = x.shape[0], wg.shape[0]
    NT = (N + 255) // 256
    counts = torch.full((M, NT), -7, dtype=torch.int32, device="cuda")
    values = torch.zeros((M, NT, 32), dtype=x.dtype, device="cuda")
    columns = torch.full((M, NT, 32), -1, dtype=torch.int16, device="cuda")
    uc = torch.zeros(N, dtype=torch.int32, device="cuda") if ucounts else None
    with override("gate", **over):
        gp_mod.launch_gate_pack(x, wg, 256, 32, counts, values, columns, uc)
    return counts, values, columns, uc


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "M,K,N,case",
    [(1, 2048, 5632, "iid"), (300, 896, 4864, "iid"), (130, 96, 1000, "iid"), (513, 2048, 700, "iid"),
     (777, 4096, 14336, "iid"), (5000, 2048, 5632, "iid"), (1000, 2048, 5632, "extremes"),
     (700, 2048, 5632, "random")],
)  # fmt: skip
def test_gate_pack_ws_bitexact(dtype, M, K, N, case):
    """The specialised-warps gate_pack (Gluon, Hopper) writes the Triton kernel's packing bit
    for bit: odd K and N, row counts off the 128-row tiles, NaN / zero / dense rows, tiles past
    S active entries, per-unit counts."""
    from twell.ops.gate_pack_ws import ws_pack_ok

    if case == "random":  # ~50 % active: every tile overflows
        x = torch.randn(M, K, dtype=dtype, device="cuda")
        wg = torch.randn(N, K, dtype=dtype, device="cuda") * 0.02
    else:
        x, wg, _, _ = _inputs(M, K, N, 30, dtype, seed=M)
    if case == "extremes":
        x[3] = 0.05
        x[7] = float("nan")
        x[11] = 0
    if not ws_pack_ok(x, wg, 256):
        pytest.skip("needs Hopper and Gluon")
    a = _launch_pack(x, wg, True, ws_min_m=0)
    b = _launch_pack(x, wg, True, use_ws="never")
    assert not gp_mod._BROKEN, f"kernel variants that failed to compile: {gp_mod._BROKEN}"
    _same_packing(a, b)
    assert torch.equal(a[3], b[3]), "unit counts"
    assert (a[0] >= 0).all()


@pytest.mark.parametrize("M", [1, 64, 2048])
def test_cuda_graph_capture(M):
    K, N = SHAPES["paper"]
    x, wg, wu, wd = _inputs(M, K, N, 30, torch.bfloat16, seed=4)
    x_static = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            ffn_infer(x_static, wg, wu, wd)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static, st_static = ffn_infer(x_static, wg, wu, wd)
    x2, *_ = _inputs(M, K, N, 30, torch.bfloat16, seed=5)
    x2[:, 0] = x[:, 0]
    x_static.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    y32, sr, y_t = _ref(x2, wg, wu, wd)
    assert_close(y_static.float(), y32, name="y (graph replay)", dtype=torch.bfloat16, baseline=y_t.float())
    assert int(st_static.overflow_rows) == int(sr.overflow_rows)


def test_opcheck_gpu():
    K, N = 256, 1000
    x, wg, wu, wd = _inputs(9, K, N, 10, torch.bfloat16)
    for path in ("prefill", "decode", "dense"):
        torch.library.opcheck(torch.ops.twell.ffn_infer.default, (x, wg, wu, wd, 256, 32, False, path))


def test_torch_compile():
    K, N = SHAPES["paper"]
    x, wg, wu, wd = _inputs(128, K, N, 30, torch.bfloat16, seed=6)

    def f(x, wg, wu, wd):
        y, st = ffn_infer(x * 1.0, wg, wu, wd)
        return y + 0.0, st.l0

    fc = torch.compile(f, fullgraph=True)
    y, l0 = fc(x, wg, wu, wd)
    y_e, l0_e = f(x, wg, wu, wd)
    assert torch.equal(y, y_e)
    assert float(l0) == float(l0_e)


def test_sparse_ffn_uses_kernels():
    import twell

    K, N = SHAPES["paper"]
    x, wg, wu, wd = _inputs(64, K, N, 30, torch.bfloat16, seed=8)
    with torch.no_grad():
        y, st = twell.sparse_ffn(x.view(8, 8, K), wg, wu, wd, return_stats=True)
    y32, _, y_t = _ref(x, wg, wu, wd)
    assert_close(y.view(64, K).float(), y32, name="y", dtype=torch.bfloat16, baseline=y_t.float())
