"""twell.sparsify_ / unsparsify_ on tiny Hugging Face decoder models (CPU, fp32)."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import twell
from twell.convert import SparsityConfig, find_gated_mlps, sparsify_, unsparsify_
from twell.testing import assert_close

transformers = pytest.importorskip("transformers")

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def tiny_model(arch: str, hidden_act: str = "relu", **kw):
    """A 2-layer, hidden-64 model of ``arch`` with random weights, in eval mode."""
    cls_cfg, cls_lm = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    args = dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
        hidden_act=hidden_act,
    )
    if arch == "qwen3":
        args["head_dim"] = 16
    args.update(kw)
    torch.manual_seed(0)
    return cls_lm(cls_cfg(**args)).eval()


def _ids(B=2, S=11, V=128):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHS)
def test_sparsify_same_logits_and_shared_params(arch):
    model = tiny_model(arch)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict().keys())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ReLU model must convert without a warning
        out_model = sparsify_(model, SparsityConfig(l1_coeff=1e-3))
    assert out_model is model
    mlps = [m for m in model.modules() if isinstance(m, twell.SparseGatedMLP)]
    assert len(mlps) == 2
    # same Parameter objects (no copy), same state-dict keys
    for n, p in model.named_parameters():
        assert p is params_before[n], n
    assert list(model.state_dict().keys()) == keys_before
    with torch.no_grad():
        out = model(ids).logits
    assert_close(out, ref.double(), name=f"{arch} logits", factor=16)
    stats = twell.sparsity_stats(model)
    assert len(stats) == 2 and all(s["tokens"] == ids.numel() for s in stats.values())
    assert all(0 < s["l0"] < 160 for s in stats.values())


@pytest.mark.parametrize("arch", ("llama", "qwen3"))
def test_non_relu_warns_and_matches_relu_model(arch):
    model = tiny_model(arch, hidden_act="silu")
    relu_model = copy.deepcopy(model)
    for layer in relu_model.model.layers:
        layer.mlp.act_fn = nn.ReLU()
    ids = _ids()
    with pytest.warns(UserWarning, match="SiLU.*changes the model's outputs"):
        sparsify_(model)
    assert model.config.hidden_act == "relu"
    with torch.no_grad():
        assert_close(model(ids).logits, relu_model(ids).logits.double(), name="relu-fied logits", factor=16)


def test_force_relu_silences_warning():
    model = tiny_model("mistral", hidden_act="silu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify_(model, SparsityConfig(force_relu=True))
    assert model.config.hidden_act == "relu"


def test_filter_fn_and_resparsify_applies_config():
    model = tiny_model("llama")
    sparsify_(model, filter_fn=lambda m, name: name.endswith("layers.1.mlp"))
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["LlamaMLP", "SparseGatedMLP"]
    sparsify_(model, SparsityConfig(l1_coeff=2e-4, slots=16, backend="reference"))
    for layer in model.model.layers:
        assert isinstance(layer.mlp, twell.SparseGatedMLP)
        assert layer.mlp.l1_coeff == 2e-4 and layer.mlp.slots == 16 and layer.mlp.backend == "reference"


def test_unsparsify_round_trip():
    model = tiny_model("qwen2")
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sparsify_(model)
    w = model.model.layers[0].mlp.gate_proj.weight
    unsparsify_(model)
    mlp = model.model.layers[0].mlp
    assert type(mlp).__name__ == "Qwen2MLP" and isinstance(mlp.act_fn, nn.ReLU)
    assert mlp.gate_proj.weight is w
    assert not any(isinstance(m, twell.SparseGatedMLP) for m in model.modules())
    new_sd = model.state_dict()
    assert list(new_sd) == list(sd) and all(torch.equal(new_sd[k], sd[k]) for k in sd)
    with torch.no_grad():
        assert_close(model(ids).logits, ref.double(), name="unsparsified logits", factor=16)


def test_unsparsify_plain_sparse_module_becomes_llama_mlp():
    holder = nn.Sequential(twell.SparseGatedMLP(16, 40))
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = holder(x)
    unsparsify_(holder)
    assert type(holder[0]).__name__ == "LlamaMLP"
    assert not holder[0].gate_proj.weight.is_meta
    with torch.no_grad():
        assert_close(holder(x), ref.double(), name="LlamaMLP output", factor=16)


def test_l1_penalty_matches_explicit_term():
    model = tiny_model("llama")
    sparsify_(model, SparsityConfig(l1_coeff=3e-4))
    ids = _ids()
    model(ids)
    explicit = []
    x_in = {}
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, o, i=i: x_in.__setitem__(i, o))
        for i, layer in enumerate(model.model.layers)
    ]
    model(ids)
    for h in hooks:
        h.remove()
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        x = x_in[i].reshape(-1, 64).double()
        hdn = torch.relu(x @ mlp.gate_proj.weight.double().T) * (x @ mlp.up_proj.weight.double().T)
        explicit.append(hdn.abs().sum(-1).mean())
    expected = 3e-4 * torch.stack(explicit).mean()
    assert_close(
        twell.l1_penalty(model).detach().reshape(1), expected.reshape(1), name="l1_penalty", factor=64
    )


def test_find_gated_mlps():
    model = tiny_model("llama")
    names = [n for n, _ in find_gated_mlps(model)]
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_bad_inputs():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="model"):
        sparsify_("not a model")
    with pytest.raises(TypeError, match="config"):
        sparsify_(model, {"l1_coeff": 1e-4})
    with pytest.raises(TypeError, match="filter_fn"):
        sparsify_(model, filter_fn=3)
    with pytest.raises(ValueError, match="no gated MLP"):
        sparsify_(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="l1_coeff"):
        SparsityConfig(l1_coeff=-1.0)
    with pytest.raises(ValueError, match="backend"):
        SparsityConfig(backend="cuda")
    with pytest.raises(ValueError, match="slots"):
        SparsityConfig(slots=0)
    with pytest.raises(TypeError, match="force_relu"):
        SparsityConfig(force_relu="yes")
    biased = tiny_model("llama", mlp_bias=True)
    with pytest.raises(ValueError, match="bias"):
        sparsify_(biased)
    # nothing was replaced by the failed call
    assert not any(isinstance(m, twell.SparseGatedMLP) for m in biased.modules())
    with pytest.raises(ValueError, match="meta"):
        with torch.device("meta"):
            meta_model = tiny_model("llama")
        sparsify_(meta_model)


def test_import_twell_stays_light():
    code = "import sys, twell; assert 'transformers' not in sys.modules, 'transformers imported'; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
    code = "import sys, twell; twell.SparsityConfig; assert 'twell.convert' in sys.modules; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_partial_swap_of_silu_model_keeps_config_and_warns():
    model = tiny_model("llama", hidden_act="silu")
    with pytest.warns(UserWarning) as rec:
        sparsify_(model, filter_fn=lambda m, name: name.endswith("layers.0.mlp"))
    messages = " ".join(str(w.message) for w in rec)
    assert "keep a non-ReLU activation" in messages
    assert model.config.hidden_act == "silu"
    # converting the rest makes the whole model ReLU
    with pytest.warns(UserWarning, match="changes the model's outputs"):
        sparsify_(model)
    assert model.config.hidden_act == "relu"


def test_filter_selecting_nothing_warns_and_changes_nothing():
    model = tiny_model("llama", hidden_act="silu")
    with pytest.warns(UserWarning, match="selected none"):
        sparsify_(model, filter_fn=lambda m, name: False)
    assert model.config.hidden_act == "silu"
    assert not any(isinstance(m, twell.SparseGatedMLP) for m in model.modules())


def test_shared_mlp_module_is_replaced_everywhere():
    """A module reachable under two names (shared layers) becomes one SparseGatedMLP under both."""
    model = tiny_model("llama")
    model.model.layers[1].mlp = model.model.layers[0].mlp
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    sparsify_(model)
    a, b = model.model.layers[0].mlp, model.model.layers[1].mlp
    assert isinstance(a, twell.SparseGatedMLP) and a is b
    with torch.no_grad():
        assert_close(model(ids).logits, ref.double(), name="shared-MLP logits", factor=16)
    unsparsify_(model)
    a, b = model.model.layers[0].mlp, model.model.layers[1].mlp
    assert type(a).__name__ == "LlamaMLP" and a is b
    with torch.no_grad():
        assert_close(model(ids).logits, ref.double(), name="shared-MLP logits after unsparsify_", factor=16)
