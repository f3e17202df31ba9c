"""`twell stats`: per-layer sparsity analysis of a tiny local model over text (CPU, no network)."""

import json

import pytest
import torch

from twell.bench.stats_cli import LayerStats, collect_stats
from twell.cli import main
from twell.ops.ffn_ref import tile_overflow_rows

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = (
    "The quick brown fox jumps over the lazy dog. Sparse models fire few units per token. "
    "A tile holds thirty-two slots; a heavy token may need more. "
) * 40


def _tiny_model(path, *, act="relu", zero_gate_rows=0):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<eos>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=200,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        hidden_act=act,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[:zero_gate_rows] = 0  # g = 0 exactly: never active (dead)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "data.txt").write_text(TEXT)
    (path / "docs.jsonl").write_text("\n".join(json.dumps({"text": TEXT[i::3]}) for i in range(3)) + "\n")
    return model, tok


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_relu_llama")
    _tiny_model(path, zero_gate_rows=5)
    return path


def test_stats_cli_writes_report_json_and_plots(tiny_dir, tmp_path):
    out = tmp_path / "stats"
    argv = ["stats", str(tiny_dir), "--data", str(tiny_dir / "data.txt"), "--seq-len", "16", "--batch", "4"]
    argv += [
        "--max-tokens",
        "384",
        "--tile",
        "64",
        "--slots",
        "8",
        "--union-tokens",
        "128",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    for name in (
        "report.txt",
        "stats.json",
        "active_per_token.png",
        "unit_rates.png",
        "tile_occupancy.png",
        "union_density.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 100, name
    data = json.loads((out / "stats.json").read_text())
    assert data["meta"]["tokens"] == 384 and data["meta"]["twell_sparse_mlps"] is True
    layers = data["layers"]
    assert len(layers) == 3
    for s in layers:
        assert s["N"] == 200 and s["tokens"] == 384
        assert s["active_p50"] <= s["active_p99"] <= s["active_max"]
        assert s["dead_units"] >= 5  # the zeroed gate rows
        assert sum(s["tile_hist"]) == 384 * 4  # ceil(200 / 64) = 4 tiles per token
        # twell's own l0 for the same tokens agrees with the counts taken from the captured input
        assert s["twell_l0"] == pytest.approx(s["active_mean"], rel=1e-5)
        curve = s["union_curve"]
        assert [p["M"] for p in curve] == [1, 2, 4, 8, 16, 32, 64, 128]
        us = [p["u"] for p in curve]
        assert us == sorted(us) and 0 < us[0] <= 1
        assert all(p["decode_bound"] == pytest.approx(3 / (1 + 2 * p["u"])) for p in curve)
    text = (out / "report.txt").read_text()
    assert "model.layers.2.mlp" in text and "decode bound" in text


def test_collect_stats_matches_an_independent_count(tiny_dir):
    from twell.bench.capture import load_model, load_tokenizer, read_texts, token_blocks

    model = load_model(tiny_dir, torch.device("cpu"), torch.float32)
    ids = token_blocks(load_tokenizer(tiny_dir), read_texts(tiny_dir / "docs.jsonl"), 24, 240)
    assert ids.shape == (10, 24)
    layers = collect_stats(model, ids, batch=3, tile=64, slots=8, union_tokens=10_000)
    # independent count: a forward hook on each act_fn input is the gate pre-activation of HF's MLP
    gates = []
    hooks = [
        layer.mlp.gate_proj.register_forward_hook(
            lambda m, a, out: gates.append(out.reshape(-1, out.shape[-1]))
        )
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    for L, g in zip(layers, gates):
        active = g > 0
        s = L.summary(hot=0.5)
        assert s["tokens"] == ids.numel()
        assert s["active_mean"] == pytest.approx(active.sum(1).float().mean().item(), rel=1e-5)
        assert s["active_max"] == active.sum(1).max().item()
        assert torch.equal(L.unit_counts, active.sum(0))
        assert s["dead_units"] == int((active.sum(0) == 0).sum())
        assert s["hot_units"] == int((active.float().mean(0) > 0.5).sum())
        ovf = int(tile_overflow_rows(active, 64, 8))
        assert s["overflow_token_fraction"] == pytest.approx(ovf / ids.numel())
        # every token was kept for u(M): the full-sample point is the union of all tokens
        assert s["union_curve"][-1]["M"] == 128
        assert L.union_kept == ids.numel()


def test_layer_stats_union_curve_extremes():
    N = 64
    same = LayerStats("same", N, 16, 4)
    act = torch.zeros(32, N, dtype=torch.bool)
    act[:, :4] = True  # every token uses the same 4 units: the union never grows
    same.add(act, torch.ones(32, dtype=torch.bool), 1000)
    assert all(p["u"] == pytest.approx(4 / N) for p in same.summary(0.5)["union_curve"])
    disjoint = LayerStats("disjoint", N, 16, 4)
    act = torch.zeros(32, N, dtype=torch.bool)
    act[torch.arange(32), torch.arange(32)] = True  # one distinct unit per token: u(M) = M / N
    disjoint.add(act, torch.ones(32, dtype=torch.bool), 1000)
    for p in disjoint.summary(0.5)["union_curve"]:
        assert p["u"] == pytest.approx(p["M"] / N)
    s = disjoint.summary(0.5)
    assert s["dead_units"] == 32 and s["hot_units"] == 0
    assert s["tile_occupancy_max"] == 1 and s["tile_overflow_fraction"] == 0.0


def test_stats_on_a_plain_silu_model_without_sparsify(tmp_path):
    _tiny_model(tmp_path, act="silu")
    out = tmp_path / "o"
    argv = [
        "stats",
        str(tmp_path),
        "--data",
        str(tmp_path / "data.txt"),
        "--seq-len",
        "16",
        "--max-tokens",
        "64",
    ]
    assert main([*argv, "--tile", "64", "--slots", "8", "--out", str(out), "--no-plots"]) == 0
    data = json.loads((out / "stats.json").read_text())
    assert data["meta"]["twell_sparse_mlps"] is False
    assert "twell_l0" not in data["layers"][0]
    assert not list(out.glob("*.png"))


def test_stats_bad_arguments(tiny_dir, tmp_path):
    data = str(tiny_dir / "data.txt")
    assert main(["stats", str(tmp_path / "missing"), "--data", data, "--out", str(tmp_path)]) == 2
    assert (
        main(["stats", str(tiny_dir), "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path)]) == 2
    )
    assert main(["stats", str(tiny_dir), "--data", data, "--hot", "2", "--out", str(tmp_path)]) == 2
    assert main(["stats", str(tiny_dir), "--data", data, "--tile", "100", "--out", str(tmp_path)]) == 2
    assert not list(tmp_path.glob("*.json"))


def test_bench_kernels_on_real_activations(tiny_dir, tmp_path):
    from twell.bench.runner import check_row

    out = tmp_path / "r"
    argv = ["bench", "kernels", "--from-model", str(tiny_dir), "--data", str(tiny_dir / "data.txt")]
    argv += [
        "--M",
        "1",
        "32",
        "--ops",
        "fwd",
        "fwdbwd",
        "--target-ms",
        "5",
        "--warmup-ms",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    (f,) = out.glob("kernels-*.jsonl")
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    assert {(r["op"], r["M"], r["provider"]) for r in rows} == {
        (op, M, p) for op in ("ffn_fwd", "ffn_fwdbwd") for M in (1, 32) for p in ("dense", "twell")
    }
    for r in rows:
        check_row(r)
        assert r["pattern"] == f"real:{tiny_dir.name}" and (r["K"], r["N"]) == (64, 200)
        assert r["layers"] == 3  # the model's 3 MLPs, each with its own captured inputs
        assert 0 < r["active_per_token"] < 200
