"""benchmarks/repro_summary.py on synthetic metrics.jsonl files (the records ``twell train`` writes)."""

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "repro_summary.py"


@pytest.fixture(scope="module")
def rs():
    spec = importlib.util.spec_from_file_location("repro_summary", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


N = 1408


def _write_run(d: Path, *, l1: float, steps: int, val_ce: list[float], active: list[float], end: bool,
               partial_tail: bool = False, run_json: dict | None = None) -> Path:  # fmt: skip
    d.mkdir(parents=True)
    sparse = l1 > 0
    recs = [
        {
            "event": "start", "step": 0, "params": 29_900_000,
            "config": {"l1_coeff": l1, "sparse_mlp": sparse, "intermediate_size": N, "max_steps": steps},
            "env": {"gpu": "NVIDIA H100 80GB HBM3"}, "precision": "bf16",
        }
    ]  # fmt: skip
    for s in range(1, steps + 1):
        # step 1 is slow (compilation): the steady state must leave it out
        tps = 1000.0 if s == 1 else 200_000.0 + (s % 3) * 1000.0
        recs.append(
            {
                "event": "train", "step": s, "tokens": s * 65536, "ce": 5.0, "tokens_per_s": tps,
                "step_time_s": 65536 / tps, "peak_mem_mib": 1000.0 + s,
                "active_mean": 10.0 if sparse else None,
                "dead_frac": (0.01 * s if sparse and s >= 2 else None),
            }
        )  # fmt: skip
        if s % 5 == 0:
            k = s // 5 - 1
            recs.append(
                {
                    "event": "eval", "step": s, "tokens": s * 65536, "val_ce": val_ce[k],
                    "val_ppl": 2.718281828 ** val_ce[k], "val_active": active[k],
                    "val_active_per_layer": [active[k] - 1.0, active[k], active[k] + 1.0],
                    "val_never_active": 0.02,
                }
            )  # fmt: skip
    if end:
        recs.append({"event": "end", "step": steps})
    text = "".join(json.dumps(r) + "\n" for r in recs)
    if partial_tail:
        text += '{"event": "train", "step": 99, "tok'  # killed mid-write
    (d / "metrics.jsonl").write_text(text)
    if run_json is not None:
        (d / "run.json").write_text(json.dumps(run_json))
    return d


def test_summary_rows_and_ratio(rs, tmp_path):
    dense = _write_run(tmp_path / "d", l1=0.0, steps=20, val_ce=[4.0, 3.6, 3.4, 3.2],
                       active=[700.0, 650.0, 600.0, 560.0], end=True,
                       run_json={"exit_code": 0, "wall_s": 200})  # fmt: skip
    sparse = _write_run(tmp_path / "s", l1=1e-3, steps=20, val_ce=[4.1, 3.7, 3.5, 3.3],
                        active=[50.0, 20.0, 12.0, 11.0], end=True)  # fmt: skip
    d, s = rs.summarize(dense, sparse)
    assert (d["kind"], s["kind"]) == ("dense", "sparse")
    assert d["val_ce"] == 3.2 and s["val_ce"] == 3.3 and s["eval_step"] == 20
    assert s["ce_ratio"] == pytest.approx(3.3 / 3.2)
    assert s["common_step"] == 20 and s["ce_ratio_common"] == pytest.approx(3.3 / 3.2)
    assert s["active_mean"] == 11.0
    assert (s["active_min_layer"], s["active_max_layer"]) == (10.0, 12.0)
    assert s["zeros_pct"] == pytest.approx(100 * (1 - 11.0 / N))
    assert s["dead_frac"] == pytest.approx(0.20) and d["dead_frac"] is None
    assert s["never_active_val"] == 0.02
    assert s["tokens_per_s"] == pytest.approx(201_000.0)  # median of steps 6..20, the slow step 1 left out
    assert s["peak_mem_mib"] == 1020.0
    assert (s["steps"], s["tokens"]) == (20, 20 * 65536)
    assert d["wall_s"] == 200 and s["wall_s"] is None
    assert d["finished"] and s["finished"]
    table = rs.markdown_table([d, s])
    lines = table.splitlines()
    assert len(lines) == 4 and all(line.startswith("|") for line in lines)
    assert "3.3000 (20)" in lines[3] and "1.0312" in lines[3] and "11.0 [10.0..12.0]" in lines[3]


def test_run_cut_short(rs, tmp_path):
    """A run killed by its time limit: no end record, a torn last line; the last evaluation is used."""
    dense = _write_run(tmp_path / "d", l1=0.0, steps=20, val_ce=[4.0, 3.6, 3.4, 3.2],
                       active=[700.0] * 4, end=True)  # fmt: skip
    sparse = _write_run(tmp_path / "s", l1=1e-3, steps=13, val_ce=[4.1, 3.7], active=[50.0, 20.0],
                        end=False, partial_tail=True, run_json={"exit_code": 124, "wall_s": 290})  # fmt: skip
    d, s = rs.summarize(dense, sparse)
    assert not s["finished"] and s["exit_code"] == 124
    assert s["steps"] == 13 and s["eval_step"] == 10 and s["val_ce"] == 3.7
    assert s["ce_ratio"] == pytest.approx(3.7 / 3.2)
    # at the last step both evaluated (10), the same learning-rate schedule point
    assert s["common_step"] == 10 and s["ce_ratio_common"] == pytest.approx(3.7 / 3.6)
    assert "1.0278 (10)" in rs.markdown_table([d, s]).splitlines()[3]


def test_main_prints_table_and_json(rs, tmp_path, capsys):
    dense = _write_run(tmp_path / "d", l1=0.0, steps=10, val_ce=[4.0, 3.5], active=[700.0, 600.0], end=True)
    sparse = _write_run(tmp_path / "s", l1=1e-3, steps=10, val_ce=[4.0, 3.6], active=[30.0, 9.0], end=True)
    rows_file = tmp_path / "rows.jsonl"
    assert rs.main([str(dense), str(sparse), "--json", str(rows_file)]) == 0
    out = capsys.readouterr().out.splitlines()
    json_rows = [json.loads(line) for line in out if line.startswith("{")]
    assert [r["run"] for r in json_rows] == ["dense", "sparse"]
    assert [json.loads(line)["run"] for line in rows_file.read_text().splitlines()] == ["dense", "sparse"]
    assert out[0].startswith("| run |")


def test_bad_inputs(rs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert rs.main([str(tmp_path / "empty"), str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"event": "start"\n{"event": "end"}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:1 is not JSON"):
        rs.read_records(bad)


def test_gzipped_metrics(rs, tmp_path):
    """A run folder holding only metrics.jsonl.gz, and a bare .jsonl.gz file, read like metrics.jsonl."""
    import gzip
    import shutil

    dense = _write_run(tmp_path / "d", l1=0.0, steps=10, val_ce=[4.0, 3.5], active=[700.0, 600.0], end=True,
                       run_json={"exit_code": 0, "wall_s": 50})  # fmt: skip
    sparse = _write_run(tmp_path / "s", l1=1e-3, steps=10, val_ce=[4.0, 3.6], active=[30.0, 9.0], end=True)
    plain = rs.summarize(dense, sparse)
    for d in (dense, sparse):
        with (d / "metrics.jsonl").open("rb") as src, gzip.open(d / "metrics.jsonl.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        (d / "metrics.jsonl").unlink()
    assert rs.metrics_path(sparse) == sparse / "metrics.jsonl.gz"
    assert rs.summarize(dense, sparse) == plain  # run.json still read from the folder
    bare = tmp_path / "sparse-metrics.jsonl.gz"
    (sparse / "metrics.jsonl.gz").rename(bare)
    d, s = rs.summarize(dense, bare)
    assert s["val_ce"] == 3.6 and s["ce_ratio"] == pytest.approx(3.6 / 3.5) and s["wall_s"] is None


_REPRO = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "repro-h100"


@pytest.mark.skipif(
    not (_REPRO / "dense-metrics.jsonl.gz").is_file(), reason="no committed H100 repro results"
)
def test_committed_h100_repro(rs):
    """The committed H100 metrics give the headline numbers of summary-l1-1.2e-3.md (docs/training.md)."""
    d, s = rs.summarize(_REPRO / "dense-metrics.jsonl.gz", _REPRO / "sparse-l1-1.2e-3-metrics.jsonl.gz")
    assert (d["steps"], s["steps"], s["tokens"]) == (800, 800, 52_428_800)
    assert d["val_ce"] == pytest.approx(2.46033, abs=1e-5) and s["val_ce"] == pytest.approx(2.48684, abs=1e-5)
    assert s["ce_ratio"] == pytest.approx(1.01078, abs=1e-5)
    assert s["zeros_pct"] == pytest.approx(99.0511, abs=1e-3) and s["zeros_pct"] >= 99.0
    assert s["dead_frac"] == pytest.approx(0.26776, abs=1e-5)
    assert d["tokens_per_s"] == pytest.approx(536_999, abs=1) and s["tokens_per_s"] == pytest.approx(
        395_633, abs=1
    )
