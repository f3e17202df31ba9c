"""`twell bench`: registry, roofline bounds, timing, rows (DESIGN 7 schema), CLI and report (CPU, small)."""

import json
import math
import time

import pytest
import torch

from twell.bench import registry, roofline
from twell.bench.energy import open_meter
from twell.bench.report import latest_rows, load_rows, render_report
from twell.bench.runner import REQUIRED_FIELDS, _activity, check_row, dense_ffn, load_callable, run_kernels
from twell.bench.timing import percentile, time_calls
from twell.cli import main
from twell.ops.ffn_ref import sparse_ffn_ref, tile_overflow_rows
from twell.testing import make_sparse_ffn

FAST = ["--target-ms", "5", "--warmup-ms", "1"]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- registry ----------------------------------------------------------------------------------


def test_registry_shapes():
    for name, layers in (("paper-0.5b", 8), ("paper-1b", 18), ("paper-1.5b", 28), ("paper-2b", 38)):
        s = registry.get_shape(name)
        assert (s.K, s.N, s.layers, s.heads, s.vocab) == (2048, 5632, layers, 32, 49152)
    assert (registry.get_shape("paper-2048x8192").N) == 8192
    assert (registry.get_shape("llama3-8b").K, registry.get_shape("llama3-8b").N) == (4096, 14336)
    assert (registry.get_shape("qwen2-0.5b").K, registry.get_shape("qwen2-0.5b").N) == (896, 4864)
    s = registry.get_shape("96x1000")
    assert (s.K, s.N) == (96, 1000)
    with pytest.raises(ValueError, match="shape"):
        registry.get_shape("nope")
    with pytest.raises(ValueError, match="preset"):
        registry.get_preset("nope")


def test_h100_preset_covers_issue_sweep():
    p = registry.get_preset("h100")
    fwd = [c for c in p.cases if c.shape == "paper-2048x5632" and "ffn_fwd" in c.ops]
    assert {1, 8, 64, 256, 2048, 16384, 131072} <= {m for c in fwd for m in c.Ms}
    assert {24.0, 39.0, 100.0, 900.0} <= {a for c in fwd if "iid" in c.patterns for a in c.actives}
    assert any("skewed" in c.patterns for c in fwd)
    assert any(c.shape == "llama3-8b" for c in p.cases)


@pytest.mark.parametrize(
    "kw, arg",
    [
        ({"Ms": (0,)}, "Ms"),
        ({"actives": (-1.0,)}, "actives"),
        ({"patterns": ("zipf",)}, "patterns"),
        ({"ops": ("fwd",)}, "ops"),
        ({"providers": ("cublas",)}, "providers"),
        ({"shape": "nope"}, "shape"),
    ],
)
def test_case_rejects_bad_fields(kw, arg):
    base = dict(shape="tiny", Ms=(1,), actives=(8.0,))
    base.update(kw)
    with pytest.raises(ValueError, match=arg):
        registry.Case(**base)


# -- bounds ------------------------------------------------------------------------------------


def _roofs(tflops, gbps):
    return roofline.Roofs("test", "bfloat16", tflops, gbps, 1, 1.0)


def test_bound_compute_regime_matches_design5():
    # unlimited bandwidth: the FLOP ratio 6/(2+4 rho) (forward) and 18/(2+16 rho) (fwd+bwd)
    r = _roofs(1.0, 1e12)
    K, N, a = 2048, 5632, 56.32  # rho = 1%
    assert roofline.speedup_bound("ffn_fwd", 16384, K, N, a, 1.0, r, 2) == pytest.approx(6 / 2.04)
    assert roofline.speedup_bound("ffn_fwdbwd", 16384, K, N, a, 1.0, r, 2) == pytest.approx(18 / 2.16)
    assert 6 / 2.04 == pytest.approx(2.94, abs=0.01)


def test_bound_memory_regime_matches_design5():
    # unlimited compute, M = 1: weight bytes 3KN vs (1 + 2u) KN, plus the x/y bytes of one token
    r = _roofs(1e12, 1.0)
    K, N, u = 2048, 5632, 0.01
    b = roofline.speedup_bound("ffn_fwd", 1, K, N, 0.01 * N, u, r, 2)
    exact = (3 * K * N * 2 + 4 * K) / ((1 + 2 * u) * K * N * 2 + 4 * K)
    assert b == pytest.approx(exact)
    assert b == pytest.approx(3 / 1.02, rel=1e-3)
    # the bound falls as the union grows and reaches 1 when every unit is in the union
    assert roofline.speedup_bound("ffn_fwd", 1, K, N, N, 1.0, r, 2) == pytest.approx(1.0)


def test_bound_rejects_bad_input():
    r = _roofs(1.0, 1.0)
    with pytest.raises(ValueError, match="u"):
        roofline.speedup_bound("ffn_fwd", 1, 8, 8, 1, 1.5, r, 2)
    with pytest.raises(ValueError, match="op"):
        roofline.speedup_bound("ffn_bwd", 1, 8, 8, 1, 0.5, r, 2)
    with pytest.raises(ValueError, match="a"):
        roofline.speedup_bound("ffn_fwd", 1, 8, 8, 9, 0.5, r, 2)


def test_union_density_and_amdahl():
    act = torch.zeros(3, 10, dtype=torch.bool)
    act[0, 1] = act[1, 1] = act[2, 7] = True
    assert roofline.union_density(act) == pytest.approx(0.2)
    assert roofline.iid_union_density(0.01, 64) == pytest.approx(1 - 0.99**64)
    assert roofline.amdahl(0.6, 2.94) == pytest.approx(1 / (0.4 + 0.6 / 2.94))
    with pytest.raises(ValueError, match="active"):
        roofline.union_density(torch.zeros(3, dtype=torch.bool))
    share = roofline.model_ffn_share(2048, 5632, 8, 32, None, 49152, 1024)
    assert 0.5 < share < 0.8


def test_measure_roofs_cpu():
    r = roofline.measure_roofs("cpu", torch.float32, quick=True)
    assert r.matmul_tflops > 0 and r.copy_gbps > 0 and r.device.startswith("CPU")


# -- timing / energy ---------------------------------------------------------------------------


def test_percentile():
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([1.0, 2.0], 20) == pytest.approx(1.2)
    with pytest.raises(ValueError, match="xs"):
        percentile([], 50)


def test_time_calls_cpu_measures_the_call():
    calls = []

    def f(i):
        calls.append(i)
        time.sleep(0.002)

    fns = [lambda i=i: f(i) for i in range(4)]
    t = time_calls(fns, "cpu", warmup_ms=0, target_ms=30, min_reps=5, max_reps=12)["wall"]
    assert t.reps % 4 == 0 and 8 <= t.reps <= 12
    assert 2.0 <= t.p20 <= t.ms <= t.p80 < 50.0
    assert {0, 1, 2, 3} == set(calls)  # every weight set was called
    with pytest.raises(ValueError, match="methods"):
        time_calls(fns, "cpu", methods=("graph",))
    with pytest.raises(ValueError, match="fns"):
        time_calls([], "cpu")


def test_energy_not_available_on_cpu():
    meter, why = open_meter("cpu")
    assert meter is None and "NVIDIA" in why


# -- measured activity -------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [16, 16384])
def test_activity_matches_reference_counts(chunk, monkeypatch):
    from twell.bench import runner

    monkeypatch.setattr(runner, "_TOKEN_CHUNK", chunk)  # 16: several chunks per prefix
    K, N, tile, slots = 32, 300, 64, 4
    weights = []
    for s in range(2):
        _, wg, wu, wd = make_sparse_ffn(1, K, N, 12.0, seed=s)
        weights.append((wg, wu, wd))
    x, *_ = make_sparse_ffn(70, K, N, 12.0, pattern="heavy", seed=0)
    act = _activity(x, weights, [1, 7, 70], tile, slots)
    for M in (1, 7, 70):
        exp_a = exp_u = exp_over = exp_max = 0.0
        for wg, _, _ in weights:
            g = x[:M] @ wg.T > 0
            exp_a += g.sum().item() / M / 2
            exp_u += roofline.union_density(g) / 2
            exp_over += int(tile_overflow_rows(g, tile, slots)) / 2
            padded = torch.nn.functional.pad(g.int(), (0, 320 - N))  # 5 tiles of 64
            exp_max = max(exp_max, padded.view(M, 5, tile).sum(-1).max().item())
        assert act[M]["tile_max"] == exp_max
        assert act[M]["active"] == pytest.approx(exp_a)
        assert act[M]["union"] == pytest.approx(exp_u)
        assert act[M]["overflow_rows"] == pytest.approx(exp_over)
    assert act[70]["overflow_rows"] > 0  # the heavy token overflows 4 slots


def test_dense_ffn_matches_reference():
    x, wg, wu, wd = make_sparse_ffn(9, 16, 40, 5.0, dtype=torch.float64)
    y_ref, _ = sparse_ffn_ref(x, wg, wu, wd)
    assert torch.equal(dense_ffn(x, wg, wu, wd), y_ref)


# -- rows --------------------------------------------------------------------------------------


def _good_row():
    row = {k: (t[0]() if t[0] is not type(None) else None) for k, t in REQUIRED_FIELDS.items()}
    row.update(ms=1.0, bench="kernels")
    return row


def test_check_row():
    row = _good_row()
    check_row(row)
    bad = dict(row)
    del bad["bound"]
    with pytest.raises(ValueError, match="bound"):
        check_row(bad)
    bad = dict(row, M=1.5)
    with pytest.raises(ValueError, match="'M'"):
        check_row(bad)
    bad = dict(row, ms=True)
    with pytest.raises(ValueError, match="'ms'"):
        check_row(bad)


def test_load_callable():
    assert load_callable("twell.bench.runner:dense_ffn") is dense_ffn
    with pytest.raises(ValueError, match="reference"):
        load_callable("no_colon")
    with pytest.raises(ValueError, match="reference"):
        load_callable("twell.bench.runner:REQUIRED_FIELDS")


def test_run_kernels_api_with_reference_provider(tmp_path):
    calls = []

    def ref(x, wg, wu, wd):
        calls.append(x.shape[0])
        return dense_ffn(x, wg, wu, wd)

    case = registry.Case("tiny", (5,), (8.0,), providers=("dense", "twell", "reference"))
    rows = run_kernels(
        cases=[case],
        reference=ref,
        target_ms=3,
        warmup_ms=0,
        quick_roofs=True,
        out_dir=tmp_path,
        energy=False,
    )
    assert [r["provider"] for r in rows] == ["dense", "twell", "reference"]
    assert calls and set(calls) == {5}
    dense = rows[0]
    for r in rows:
        check_row(r)
        assert r["speedup_vs_dense"] == pytest.approx(dense["ms"] / r["ms"])
        assert r["achieved_over_bound"] == pytest.approx(r["speedup_vs_dense"] / r["bound"])
        assert r["tokens_per_ms"] == pytest.approx(5 / r["ms"])
        assert r["gpu"].startswith("CPU")  # CPU numbers are labelled as such
    (f,) = tmp_path.glob("kernels-*.jsonl")
    assert len(_rows(f)) == 3
    with pytest.raises(ValueError, match="reference"):
        run_kernels(cases=[case], target_ms=3, quick_roofs=True)
    with pytest.raises(ValueError, match="preset"):
        run_kernels("model-tiny")
    with pytest.raises(ValueError, match="actives"):
        run_kernels(cases=[registry.Case("tiny", (5,), (1e6,))], quick_roofs=True)


# -- CLI: kernels + report ---------------------------------------------------------------------


def test_cli_bench_kernels_tiny_and_report(tmp_path):
    out = tmp_path / "results"
    assert main(["bench", "kernels", "--preset", "tiny", "--out", str(out), *FAST]) == 0
    (f,) = out.glob("kernels-*.jsonl")
    rows = _rows(f)
    for r in rows:
        check_row(r)
        assert r["bench"] == "kernels" and r["dtype"] == "float32" and r["device"] == "cpu"
        assert r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert r["bound"] >= 1.0 and math.isfinite(r["achieved_over_bound"])
        assert 0.0 < r["union_density"] <= 1.0
    preset = registry.get_preset("tiny")
    want = {
        (op, M, a, pat, prov)
        for c in preset.cases
        for op in c.ops
        for M in c.Ms
        for a in c.actives
        for pat in c.patterns
        for prov in c.providers
    }
    got = {(r["op"], r["M"], r["target_active"], r["pattern"], r["provider"]) for r in rows}
    assert got == want
    # the measured active count tracks the target (iid, 256 tokens x 4 weight sets)
    for r in rows:
        if r["M"] == 256:
            assert abs(r["active_per_token"] - r["target_active"]) < 0.35 * r["target_active"]
        if r["provider"] == "twell":
            assert r["twell_path"] == "reference"  # CPU: the torch reference path, and rows say so
    md = tmp_path / "BENCHMARKS.md"
    plots = tmp_path / "plots"
    assert main(["bench", "report", str(out), "--output", str(md), "--plots", str(plots)]) == 0
    text = md.read_text()
    assert "| GPU | CUDA | torch | triton | commit |" in text
    assert "ffn_fwd / tiny" in text and "ffn_fwdbwd / tiny" in text
    names = {p.name for p in plots.glob("*.png")}
    assert any(n.endswith("ffn_fwd-tiny-speedup-vs-M.png") for n in names)
    assert any(n.endswith("ffn_fwd-tiny-speedup-vs-active.png") for n in names)
    assert not any(n.endswith("-memory.png") for n in names)  # no memory counter on CPU
    for p in plots.glob("*.png"):
        assert p.stat().st_size > 1000


def test_cli_bad_arguments(tmp_path, capsys):
    assert main(["bench", "kernels", "--preset", "nope", "--out", str(tmp_path)]) == 2
    assert main(["bench", "kernels", "--preset", "model-tiny", "--out", str(tmp_path)]) == 2
    assert main(["bench", "kernels", "--ops", "bwd", "--out", str(tmp_path)]) == 2
    assert "ops" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.jsonl"))


def test_report_keeps_model_decode_variants_apart(tmp_path):
    # eager decode and decode replayed as a CUDA graph are two measurements of the same case
    rows = []
    for variant, ms in ((None, 2.0), ("cuda-graph", 1.0)):
        for prov in ("dense", "twell"):
            rows.append(
                dict(
                    _good_row(), bench="model", op="decode", shape="s", K=8, N=16, M=1,
                    active_per_token=2.0, pattern="iid", provider=prov, variant=variant,
                    ms=ms, speedup_vs_dense=1.0, bound=1.5, achieved_over_bound=0.67, gpu="TestGPU",
                )
            )  # fmt: skip
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert len(latest_rows(load_rows([tmp_path]))) == 4
    out = tmp_path / "R.md"
    render_report([tmp_path], out)
    text = out.read_text()
    assert "### model / decode / s" in text and "### model / decode-cuda-graph / s" in text


def test_report_keeps_latest_and_draws_energy_and_memory_bars(tmp_path):
    base = _good_row()
    rows = []
    for ts, ms in (("2026-01-01T00:00:00+00:00", 2.0), ("2026-01-02T00:00:00+00:00", 1.0)):
        for prov in ("dense", "twell"):
            rows.append(
                dict(
                    base,
                    op="ffn_fwd",
                    shape="s",
                    K=8,
                    N=16,
                    M=4096,
                    active_per_token=2.0,
                    pattern="iid",
                    provider=prov,
                    ms=ms if prov == "twell" else 2.0,
                    speedup_vs_dense=2.0 / ms if prov == "twell" else 1.0,
                    bound=2.5,
                    achieved_over_bound=0.5,
                    peak_mem_mib=10.0,
                    energy_mj_per_token=0.1,
                    gpu="TestGPU",
                    timestamp=ts,
                )
            )
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    kept = latest_rows(load_rows([tmp_path]))
    assert len(kept) == 2 and all(r["timestamp"].startswith("2026-01-02") for r in kept)
    res = render_report([tmp_path], tmp_path / "B.md", tmp_path / "p")
    names = {p.name for p in res["plots"]}
    assert "testgpu-energy.png" in names and "testgpu-memory.png" in names
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_rows([tmp_path / "bad.jsonl"])


# -- model and train modes (tiny, CPU) ---------------------------------------------------------


def test_cli_bench_model_and_train_tiny(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "r"
    assert main(["bench", "model", "--preset", "model-tiny", "--out", str(out), "--reps", "2", *FAST]) == 0
    assert main(["bench", "train", "--preset", "train-tiny", "--out", str(out), "--reps", "2", *FAST]) == 0
    rows = [r for f in sorted(out.glob("*.jsonl")) for r in _rows(f)]
    ops = {(r["bench"], r["op"], r["provider"]) for r in rows}
    assert {
        ("model", "prefill", "dense"),
        ("model", "decode", "twell"),
        ("train", "train_step", "twell"),
    } <= ops
    for r in rows:
        check_row(r)
        assert r["bound"] >= 1.0
    tr = [r for r in rows if r["op"] == "train_step" and r["provider"] == "twell"]
    # the fixture calibrates ~8 active units per token; the sparse model's own l0 is what rows report
    assert 2.0 < tr[0]["active_per_token"] < 24.0


def test_cli_bench_model_cuda_graph_flag_reaches_bench_model(tmp_path, monkeypatch):
    # --cuda-graph replays the decode steps as CUDA graphs
    pytest.importorskip("transformers")
    import twell.models as models

    seen = {}

    def fake_bench_model(*args, **kw):
        seen.update(kw)
        return []

    monkeypatch.setattr(models, "bench_model", fake_bench_model)
    out = tmp_path / "r"
    assert main(["bench", "model", "--preset", "model-tiny", "--out", str(out), "--cuda-graph", *FAST]) == 0
    assert seen.get("cuda_graph") is True
    seen.clear()
    assert main(["bench", "model", "--preset", "model-tiny", "--out", str(out), *FAST]) == 0
    assert "cuda_graph" not in seen and seen.get("seq") == 16


# -- CUDA (run by the GPU suite) ---------------------------------------------------------------


@pytest.mark.gpu
def test_bench_kernels_on_cuda(tmp_path):
    case = registry.Case("1024x4096", (1, 64, 2048), (30.0,), ("iid",), registry.KERNEL_OPS)
    rows = run_kernels(
        cases=[case], target_ms=30, warmup_ms=10, quick_roofs=True, out_dir=tmp_path, graphs=True,
        energy_min_tokens=2048, energy_s=0.5,
    )  # fmt: skip
    assert len(rows) == 3 * 2 * 2
    meter, _ = open_meter("cuda")
    for r in rows:
        check_row(r)
        assert r["device"] == "cuda" and r["dtype"] == "bfloat16" and r["timing"] == "queued"
        assert r["queued_ok"] is True  # every timed call was issued before the GPU reached it
        assert r["peak_mem_mib"] > 0 and r["roof_matmul_tflops"] > 1.0 and r["roof_copy_gbps"] > 10.0
        assert r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        if meter is not None and r["M"] >= 2048:
            assert r["energy_mj_per_token"] > 0
        if r["op"] == "ffn_fwd":
            assert "graph_ms" in r
    dense_1 = next(r for r in rows if r["M"] == 1 and r["op"] == "ffn_fwd" and r["provider"] == "dense")
    # device time excludes host launch cost: it cannot exceed the eager time by more than noise
    assert dense_1["ms"] <= 1.2 * dense_1["eager_ms"]
    for r in rows:
        if r["provider"] == "twell" and r["op"] == "ffn_fwd":
            assert r["twell_path"] == "triton"
            # None: the dispatcher of this install could not be read
            assert r["twell_dispatch"] in ("prefill", "decode", "dense", None)
