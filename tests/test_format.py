"""TwELL round trips (torch path and Triton kernel), validate(), sizes and bad input."""

import pytest
import torch

import twell
from twell import TwELL

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MS = [1, 7, 300]
NS = [1, 100, 255, 256, 1000, 5632]
DENSITIES = ["0%", "1%", "50%", "100%", "dense-row"]


def make_h(M, N, density, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, N, generator=g)
    mag = h.abs() + 0.01
    if density == "0%":
        h = -mag
    elif density == "100%":
        h = mag
    elif density == "1%":
        h = torch.where(torch.rand(M, N, generator=g) < 0.01, mag, -mag)
    elif density == "dense-row":
        h = torch.where(torch.rand(M, N, generator=g) < 0.01, mag, -mag)
        h[M // 2] = mag[M // 2]
    return h.to(dtype=dtype, device=device)


def assert_roundtrip(h, P):
    d = P.to_dense()
    r = torch.relu(h)
    assert d.dtype == h.dtype and d.shape == h.shape
    # bit-exact on every entry (+0.0 and -0.0 both compare equal to relu's output)
    assert torch.equal(torch.isnan(d), torch.isnan(r))
    assert torch.equal(torch.nan_to_num(d, nan=0.0), torch.nan_to_num(r, nan=0.0))
    P.validate()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("M", MS)
def test_roundtrip_torch(M, N, density, dtype):
    h = make_h(M, N, density, dtype)
    P = TwELL.from_dense(h, backend="torch")
    assert_roundtrip(h, P)
    expect = int((h > 0).sum())
    assert P.nnz == expect
    assert P.density == pytest.approx(expect / (M * N))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("M", MS)
def test_roundtrip_triton_matches_torch(M, N, density, dtype, kdevice, poison):
    h = make_h(M, N, density, dtype, device=kdevice)
    P = TwELL.from_dense(h, backend="triton")
    assert_roundtrip(h, P)
    Q = TwELL.from_dense(h.cpu(), backend="torch")
    # the kernel and the reference produce the same arrays, slot for slot
    assert torch.equal(P.counts.cpu(), Q.counts)
    assert torch.equal(P.columns.cpu(), Q.columns)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(P.values.cpu().view(bits), Q.values.view(bits))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_overflow_is_exact_and_counted(backend, kdevice):
    # 3 rows: one with 200 active in tile 0 (S = 32), one with exactly S, one empty
    N = 600
    h = -torch.ones(3, N)
    h[0, :200] = torch.arange(1, 201, dtype=torch.float32)
    h[1, 256 : 256 + 32] = 2.0
    h = h.to(kdevice)
    if backend == "torch":
        h = h.cpu()
    P = TwELL.from_dense(h, backend=backend)
    assert P.counts[0, 0].item() == 200  # true count, above S
    assert P.counts[1, 1].item() == 32
    assert P.overflow == 1
    assert P.overflow_ids.tolist() == [0]
    # the stored slots of the overflowing tile are its first S entries by column
    assert (P.columns[0, 0].long() & 0xFFFF).tolist() == list(range(32))
    assert_roundtrip(h, P)


def test_keep_overflow_false_refuses_lossy_to_dense():
    h = torch.ones(2, 256)
    P = TwELL.from_dense(h, keep_overflow=False)
    assert P.overflow == 2
    assert P.counts.tolist() == [[256], [256]]
    with pytest.raises(ValueError, match="keep_overflow=False"):
        P.to_dense()
    # without overflow, to_dense works with keep_overflow=False too
    h2 = -torch.ones(2, 256)
    h2[:, 5] = 3.0
    assert torch.equal(TwELL.from_dense(h2, keep_overflow=False).to_dense(), torch.relu(h2))


def test_nan_and_inf_round_trip():
    h = torch.tensor([[float("nan"), -1.0, float("inf"), -float("inf"), 0.0, -0.0, 3.0]])
    P = TwELL.from_dense(h, tile=16, slots=4)
    assert_roundtrip(h, P)
    assert P.counts.item() == 3  # NaN, +inf, 3.0


def test_leading_dims_and_custom_geometry():
    h = torch.randn(2, 3, 5, 130)
    P = TwELL.from_dense(h, tile=64, slots=8)
    assert P.counts.shape == (30, 3) and P.values.shape == (30, 3, 8)
    assert_roundtrip(h, P)


def test_column_indices_cover_65536():
    h = -torch.ones(2, 65536)
    cols = [0, 255, 256, 32767, 32768, 40000, 65535]
    h[0, cols] = 1.5
    h[1, 65535] = 2.5
    P = TwELL.from_dense(h, backend="torch")
    stored = (P.columns.long() & 0xFFFF)[P.values > 0]
    assert sorted(stored.tolist()) == sorted(cols + [65535])
    assert_roundtrip(h, P)


def test_validate_catches_corruption():
    h = torch.where(torch.rand(5, 700) < 0.05, torch.rand(5, 700) + 0.1, -torch.ones(5, 700))
    h[3, :300] = 1.0  # row 3 overflows tiles 0 and 1
    P = TwELL.from_dense(h).validate()

    bad = TwELL(**{**P.__dict__, "counts": P.counts.clone()})
    bad.counts[2, 1] = 300  # more than the tile's 256 columns
    with pytest.raises(ValueError, match=r"count 300 at \(row 2, tile 1\)"):
        bad.validate()

    bad = TwELL(**{**P.__dict__, "counts": P.counts.clone()})
    bad.counts[1, 0] += 1  # claims one more entry than stored: an unused slot is read
    with pytest.raises(ValueError):
        bad.validate()

    bad = TwELL(**{**P.__dict__, "counts": P.counts.clone()})
    bad.counts[3, 0] = 40  # overflowing row whose count disagrees with its dense row
    with pytest.raises(ValueError, match="overflowing rows"):
        bad.validate()

    bad = TwELL(**{**P.__dict__, "columns": P.columns.clone()})
    r, t = (P.counts[:, 0] >= 2).nonzero()[0].item(), 0
    bad.columns[r, t, 1] = bad.columns[r, t, 0]
    with pytest.raises(ValueError, match="strictly increasing"):
        bad.validate()

    bad = TwELL(**{**P.__dict__, "columns": P.columns.clone()})
    bad.columns[r, 2, 0] = 3  # tile 2 starts at column 512
    bad.counts = P.counts.clone()
    bad.counts[r, 2] = max(1, int(bad.counts[r, 2]))
    with pytest.raises(ValueError, match="outside its tile"):
        bad.validate()

    bad = TwELL(**{**P.__dict__, "overflow_ids": P.overflow_ids[:0]})
    with pytest.raises(ValueError, match="overflow_ids"):
        bad.validate()


def test_nbytes_and_repr():
    h = torch.randn(4, 512)
    P = TwELL.from_dense(h)
    assert P.nbytes() >= 4 * 2 * 4 + 4 * 2 * 32 * (4 + 2)
    assert "TwELL(shape=(4, 512)" in repr(P)
    assert twell.TwELL is TwELL


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"h": [1.0, 2.0]}, TypeError, "h: expected a torch.Tensor"),
        ({"h": torch.ones(3, 4, dtype=torch.int32)}, TypeError, "h: dtype int32"),
        ({"h": torch.ones(3, 4, dtype=torch.float64)}, TypeError, "h: dtype float64"),
        ({"h": torch.ones(())}, ValueError, "h: expected at least 1"),
        ({"h": torch.ones(3, 0)}, ValueError, "h: last dimension N must be at least 1"),
        ({"h": torch.ones(1, 65537)}, ValueError, "h: last dimension N=65537 exceeds"),
        ({"h": torch.ones(3, 4), "tile": 100}, ValueError, "tile: must be a power of two"),
        ({"h": torch.ones(3, 4), "tile": 8}, ValueError, "tile: must be a power of two"),
        ({"h": torch.ones(3, 4), "slots": 0}, ValueError, "slots: must be an int"),
        ({"h": torch.ones(3, 4), "slots": 300}, ValueError, "slots: must be an int"),
        ({"h": torch.ones(3, 4), "backend": "cuda"}, ValueError, "backend: expected"),
    ],
)
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TwELL.from_dense(**kwargs)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend: 'triton' needs a CUDA tensor"):
        TwELL.from_dense(torch.ones(2, 8), backend="triton")


@pytest.mark.parametrize("use_triton", [False, True])
def test_pack_custom_op_passes_opcheck(use_triton, kdevice):
    from twell.ops.pack import _pack_op

    device = kdevice if use_triton else "cpu"
    h = torch.randn(9, 300, device=device)
    torch.library.opcheck(_pack_op, (h, 256, 32, use_triton))


def test_non_contiguous_input(kdevice):
    h = torch.randn(300, 10, device=kdevice).T  # [10, 300] with column stride 10
    P = TwELL.from_dense(h)
    assert_roundtrip(h, P)
