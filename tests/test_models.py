"""twell.models: sparse Llama classes, Auto registration, save/load, SparseLM checkpoint layouts (CPU)."""

import json
import os
import warnings

import pytest
import torch

import twell

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM  # noqa: E402

import twell.models as tm  # noqa: E402
from twell.models.fixtures import tiny_llama_config  # noqa: E402
from twell.testing import assert_close  # noqa: E402


def _ids(B=2, S=9, V=128):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3))


def _dense(tie=False):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tie)).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _write_sparselm(dense, path, *, transpose_down=False, shards=1, hidden_act="silu", fmt="safetensors"):
    """Writes ``dense`` in the released SparseLM layout: HF Llama keys, model_type
    "llama_sparse_relu", config saying ``hidden_act: silu``; optionally ``down_proj`` stored [N, K]."""
    os.makedirs(path, exist_ok=True)
    sd = {}
    for k, v in dense.state_dict().items():
        if k == "lm_head.weight" and dense.config.tie_word_embeddings:
            continue
        if transpose_down and k.endswith("mlp.down_proj.weight"):
            v = v.t()
        sd[k] = v.detach().clone().contiguous()
    keys = list(sd)
    if fmt == "bin":
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    elif shards == 1:
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per = (len(keys) + shards - 1) // shards
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: sd[k] for k in keys[i * per : (i + 1) * per]}
            save_file(part, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    cfg = dense.config.to_dict()
    cfg.update(
        model_type="llama_sparse_relu",
        architectures=["SparseLlamaForCausalLM"],
        hidden_act=hidden_act,
        sparsity_l1_coeff=2e-5,
        sparsity_use_hybrid_kernel=transpose_down,
        sparsity_l0_cutoff=50,
    )
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)


def test_registered_with_auto_classes():
    cfg = AutoConfig.for_model("twell_sparse_llama", hidden_size=64, num_attention_heads=4)
    assert isinstance(cfg, tm.TwellSparseLlamaConfig) and cfg.hidden_act == "relu"
    assert isinstance(
        AutoConfig.for_model("llama_sparse_relu", hidden_size=64, num_attention_heads=4), tm.SparseLMConfig
    )
    tm.register()  # idempotent


def test_model_has_sparse_mlps_and_matches_dense():
    dense = _dense()
    cfg = tm.TwellSparseLlamaConfig(**{**tiny_llama_config().to_dict(), "sparsity_l1_coeff": 1e-4})
    model = tm.TwellSparseLlamaForCausalLM(cfg).eval()
    assert all(isinstance(layer.mlp, twell.SparseGatedMLP) for layer in model.model.layers)
    assert all(layer.mlp.l1_coeff == 1e-4 for layer in model.model.layers)
    assert set(model.state_dict()) == set(dense.state_dict())
    model.load_state_dict(dense.state_dict())
    ids = _ids()
    assert_close(_logits(model, ids), _logits(dense, ids).double(), name="sparse-model logits", factor=16)


def test_config_rejects_other_activation():
    with pytest.raises(ValueError, match="hidden_act"):
        tm.TwellSparseLlamaConfig(hidden_act="silu")


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip_and_plain_llama_fallback(tmp_path, tie):
    dense = _dense(tie)
    ids = _ids()
    ref = _logits(dense, ids)
    cfg = tm.TwellSparseLlamaConfig(
        **{**dense.config.to_dict(), "sparsity_l1_coeff": 3e-4, "twell_slots": 16}
    )
    model = tm.TwellSparseLlamaForCausalLM(cfg).eval()
    model.load_state_dict(dense.state_dict())
    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors")
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(back) is tm.TwellSparseLlamaForCausalLM
    mlp = back.model.layers[0].mlp
    assert isinstance(mlp, twell.SparseGatedMLP) and mlp.l1_coeff == 3e-4 and mlp.slots == 16
    assert not mlp.unit_counts.is_meta
    assert_close(_logits(back, ids), ref.double(), name="reloaded logits", factor=16)
    # the same directory in plain transformers: a dense ReLU Llama with the same outputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert plain.config.hidden_act == "relu"
    assert type(plain.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert_close(_logits(plain, ids), ref.double(), name="plain-Llama logits", factor=16)


def test_sparsified_llama_saves_as_relu_llama(tmp_path):
    dense = _dense()
    dense.config.hidden_act = "silu"
    for layer in dense.model.layers:
        layer.mlp.act_fn = torch.nn.SiLU()
    twell.sparsify_(dense, twell.SparsityConfig(force_relu=True))
    ids = _ids()
    ref = _logits(dense, ids)
    twell.unsparsify_(dense).save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(back) is LlamaForCausalLM and back.config.hidden_act == "relu"
    assert_close(_logits(back, ids), ref.double(), name="saved ReLU Llama logits", factor=16)


@pytest.mark.parametrize(
    "transpose_down,shards,fmt",
    [(False, 1, "safetensors"), (True, 1, "safetensors"), (True, 3, "safetensors"), (True, 1, "bin")],
)
def test_sparselm_layouts_load_with_correct_logits(tmp_path, transpose_down, shards, fmt):
    dense = _dense(tie=True)
    ids = _ids()
    ref = _logits(dense, ids)
    _write_sparselm(dense, tmp_path, transpose_down=transpose_down, shards=shards, fmt=fmt)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model = AutoModelForCausalLM.from_pretrained(tmp_path)
    transposed_warnings = [w for w in rec if "stored transposed" in str(w.message)]
    assert len(transposed_warnings) == (1 if transpose_down else 0)
    assert type(model) is tm.SparseLMForCausalLM
    assert model.config.hidden_act == "relu" and model.config.checkpoint_hidden_act == "silu"
    assert all(layer.mlp.l1_coeff == 2e-5 for layer in model.model.layers)
    w_down = model.model.layers[1].mlp.down_proj.weight
    assert tuple(w_down.shape) == (64, 160)
    assert torch.equal(w_down, dense.model.layers[1].mlp.down_proj.weight)
    assert_close(
        _logits(model.eval(), ids),
        ref.double(),
        name=f"SparseLM logits (transposed={transpose_down})",
        factor=16,
    )


def test_sparselm_bad_layouts(tmp_path):
    dense = _dense()
    # a down_proj of a shape that is neither [K, N] nor [N, K]
    _write_sparselm(dense, tmp_path / "bad")
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "bad" / "model.safetensors")
    sd["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 150)
    save_file(sd, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(ValueError, match="down_proj.weight has shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "bad")
    # the non-gated variant (no gate_proj) is refused by name
    _write_sparselm(dense, tmp_path / "nongated")
    sd = load_file(tmp_path / "nongated" / "model.safetensors")
    sd = {k: v for k, v in sd.items() if "gate_proj" not in k}
    save_file(sd, tmp_path / "nongated" / "model.safetensors")
    with pytest.raises(ValueError, match="non-gated"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "nongated")


def test_fix_transposed_down_proj_helper():
    sd = {
        "model.layers.0.mlp.down_proj.weight": torch.arange(12.0).reshape(4, 3),  # [N=4, K=3]: transposed
        "model.layers.1.mlp.down_proj.weight": torch.zeros(3, 4),
        "model.layers.0.mlp.up_proj.weight": torch.zeros(4, 3),
    }
    t = sd["model.layers.0.mlp.down_proj.weight"].clone()
    assert tm.fix_transposed_down_proj(sd, 3, 4) == ["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(sd["model.layers.0.mlp.down_proj.weight"], t.t())
    assert sd["model.layers.0.mlp.down_proj.weight"].is_contiguous()


def test_load_checkpoint_state_dict_errors(tmp_path):
    with pytest.raises(ValueError, match="path"):
        tm.load_checkpoint_state_dict(str(tmp_path))
