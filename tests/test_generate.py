"""generate() with the KV cache, training gradients through the HF path, and the benchmark fixture (CPU)."""

import copy

import pytest
import torch

import twell

transformers = pytest.importorskip("transformers")
from transformers import LlamaForCausalLM  # noqa: E402

from twell.models.fixtures import (  # noqa: E402
    bench_model,
    make_sparse_llama_,
    measure_active_units,
    model_bound,
    paper_config,
    tiny_llama_config,
)
from twell.testing import assert_close  # noqa: E402

REQUIRED_ROW_KEYS = (
    "bench op shape K N M active_per_token pattern provider dtype ms ms_p20 ms_p80 tokens_per_ms "
    "speedup_vs_dense bound achieved_over_bound peak_mem_mib energy_mj_per_token gpu torch triton "
    "commit timestamp"
).split()


def _pair(sparse_fixture: bool):
    torch.manual_seed(0)
    dense = LlamaForCausalLM(tiny_llama_config(intermediate_size=512)).eval()
    if sparse_fixture:
        make_sparse_llama_(dense, active_per_token=12, calib_seq=64)
    sparse = twell.sparsify_(copy.deepcopy(dense))
    return dense, sparse


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("sparse_fixture", [False, True])
def test_greedy_generation_identical_to_dense(cache, sparse_fixture):
    dense, sparse = _pair(sparse_fixture)
    prompt = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    if cache is not None:
        kw["cache_implementation"] = cache
    with torch.no_grad():
        ref = dense.generate(prompt, **kw)
        out = sparse.generate(prompt, **kw)
    assert out.shape == (2, 7 + 32)
    assert torch.equal(out, ref), "greedy tokens differ from the dense model"
    # the last forward was a decode step: M = batch size
    stats = twell.sparsity_stats(sparse)
    assert all(s["tokens"] == 2 for s in stats.values())


def test_generation_left_padded_batch():
    dense, sparse = _pair(True)
    prompt = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(prompt)
    mask[0, :4] = 0
    prompt[0, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(sparse.generate(prompt, **kw), dense.generate(prompt, **kw))


def _dense_loss_with_l1(model, ids, coeff):
    """CE loss + coeff * mean over layers of mean over tokens of sum |h|, with h read at down_proj's input."""
    hs = []
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: hs.append(a[0]))
        for layer in model.model.layers
    ]
    try:
        out = model(ids, labels=ids)
    finally:
        for h in hooks:
            h.remove()
    l1 = torch.stack([h.abs().sum(-1).mean() for h in hs]).mean()
    return out.loss + coeff * l1


@pytest.mark.parametrize("sparse_fixture", [False, True])
def test_training_gradients_match_dense_reference(sparse_fixture):
    dense, sparse = _pair(sparse_fixture)
    dense.train()
    sparse.train()
    coeff = 3e-2  # large, so that the L1 term's gradient is a visible part of the total
    twell.sparsify_(sparse, twell.SparsityConfig(l1_coeff=coeff))
    ids = torch.randint(0, 128, (3, 13), generator=torch.Generator().manual_seed(7))
    out = sparse(ids, labels=ids)
    loss = out.loss + twell.l1_penalty(sparse)
    loss.backward()
    ref = _dense_loss_with_l1(dense, ids, coeff)
    ref.backward()
    assert_close(loss.detach().reshape(1), ref.detach().double().reshape(1), name="loss", factor=16)
    d_params = dict(dense.named_parameters())
    n_checked = 0
    for name, p in sparse.named_parameters():
        q = d_params[name]
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None, f"{name}: no gradient through the sparse path"
        assert_close(p.grad, q.grad.double(), name=f"grad {name}", factor=64)
        n_checked += 1
    assert n_checked >= 9 * 2  # every projection and norm of both layers


def test_l1_gradient_reaches_gate_and_up():
    """With CE removed, only the L1 term drives gradients: gate_proj/up_proj must get them."""
    _, sparse = _pair(True)
    twell.sparsify_(sparse, twell.SparsityConfig(l1_coeff=1.0))
    sparse(torch.randint(0, 128, (2, 5)))
    twell.l1_penalty(sparse).backward()
    mlp = sparse.model.layers[0].mlp
    assert mlp.gate_proj.weight.grad is not None and mlp.gate_proj.weight.grad.abs().sum() > 0
    assert mlp.up_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixture_reaches_target_active_units(dtype):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=1024, num_hidden_layers=3))
    model = model.to(dtype).eval()
    before = measure_active_units(model, torch.randint(0, 128, (2, 64)))
    assert min(before) > 300  # random weights: about half of the 1024 units fire
    make_sparse_llama_(model, active_per_token=30, calib_batch=4, calib_seq=256)
    ids = torch.randint(0, 128, (4, 200), generator=torch.Generator().manual_seed(9))
    after = measure_active_units(model, ids)
    assert all(27 <= a <= 33 for a in after), after
    # shorter sequences (decode-like contexts) stay close to the target
    short = measure_active_units(model, ids[:, :16])
    assert all(25 <= a <= 36 for a in short), short


def test_bench_decode_loop_matches_generate():
    # the model benchmark's decode loop (static cache, greedy) continues like generate()
    from twell.models.fixtures import _decode_fn

    cfg = tiny_llama_config(hidden_size=64, intermediate_size=256, num_hidden_layers=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    # no pad token among the ids (generate would read it as padding)
    ids = torch.randint(1, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    model.generation_config.disable_compile = True
    for m in (model, twell.sparsify_(model)):
        run = _decode_fn(m, ids, 5, cuda_graph=False)
        run()
        with torch.no_grad():
            out = m.generate(
                ids,
                max_new_tokens=6,
                min_new_tokens=6,
                do_sample=False,
                pad_token_id=0,
                cache_implementation="static",
            )
        assert torch.equal(run.last, out[:, -1:])
        run()  # a second call rewrites the same cache positions: same result
        assert torch.equal(run.last, out[:, -1:])


def test_bench_model_rows_on_cpu():
    cfg = tiny_llama_config(hidden_size=64, intermediate_size=512, num_hidden_layers=2)
    rows = bench_model(
        config=cfg,
        batch=2,
        seq=32,
        decode_batches=(1,),
        decode_context=8,
        decode_tokens=2,
        active_per_token=10,
        dtype=torch.float32,
        device="cpu",
        warmup=0,
        reps=1,
    )
    assert {(r["op"], r["M"], r["provider"]) for r in rows} == {
        ("prefill", 64, "dense"),
        ("prefill", 64, "twell"),
        ("decode", 1, "dense"),
        ("decode", 1, "twell"),
    }
    for r in rows:
        missing = [k for k in REQUIRED_ROW_KEYS if k not in r]
        assert not missing, missing
        assert 7 <= r["active_per_token"] <= 13
        assert r["ms"] >= 0 and r["bound"] >= 1.0
    with pytest.raises(ValueError, match="providers"):
        bench_model(config=cfg, providers=("cublas",), device="cpu")


def test_bench_model_energy_per_token_from_a_meter():
    # with an energy meter, each case runs extra calls between two counter reads; the row divides
    # the energy per call by the tokens of a call (prompt tokens / generated tokens)
    class Meter:
        source = "test"

        def __init__(self):
            self.mj = 0

        def read_mj(self):
            self.mj += 1000
            return self.mj

    cfg = tiny_llama_config(hidden_size=64, intermediate_size=512, num_hidden_layers=2)
    kw = dict(config=cfg, batch=2, seq=16, decode_batches=(1,), decode_context=8, decode_tokens=2)
    rows = bench_model(
        **kw, active_per_token=10, dtype=torch.float32, device="cpu", warmup=0, reps=1,
        energy_meter=Meter(), energy_s=1e-6,
    )  # fmt: skip
    for r in rows:
        # one call per measurement (1 us is shorter than any call): 1000 mJ per call
        tokens = 2 * 16 if r["op"] == "prefill" else 1 * 2
        assert r["energy_mj_per_token"] == pytest.approx(1000 / tokens), r["op"]
    assert all(r["energy_mj_per_token"] is None for r in bench_model(**kw, device="cpu", warmup=0, reps=1))


def test_model_bound_paper_shapes():
    cfg = paper_config("2b")
    b = model_bound(cfg, "prefill", 16, 2048, 30)
    assert 1.5 < b < 2.0  # FFN ~62% of the FLOPs; FFN bound ~2.96x at 30/5632
    d1 = model_bound(cfg, "decode", 1, 1, 30, context=512)
    d8 = model_bound(cfg, "decode", 8, 1, 30, context=512)
    assert d1 > d8 > 1.0


def test_gradient_checkpointing_non_reentrant_keeps_l1_gradient():
    """The L1 term is read from module state set during forward; non-reentrant checkpointing keeps
    its graph (reentrant checkpointing runs the forward under no_grad and would drop it)."""
    _, sparse = _pair(True)
    twell.sparsify_(sparse, twell.SparsityConfig(l1_coeff=3e-2))
    sparse.train()
    ckpt = copy.deepcopy(sparse)
    if hasattr(ckpt, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so
        ckpt.activation_checkpointing_enable({"use_reentrant": False})
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(8))
    for m in (sparse, ckpt):
        (m(ids, labels=ids).loss + twell.l1_penalty(m)).backward()
    for (name, p), q in zip(sparse.named_parameters(), ckpt.parameters()):
        assert_close(q.grad, p.grad.double(), name=f"checkpointed grad {name}", factor=64)


# -- the kernel path (Triton on CUDA, or the Triton interpreter on CPU) through the HF model ---------


def _kernel_models(kdevice):
    """(float64 reference, float32 dense, float32 sparse on the Triton backend), same weights.

    ``block_out_scale=1`` keeps the FFN's share of the residual stream large, so an error in the
    FFN shows in the logits."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(intermediate_size=512)).eval()
    make_sparse_llama_(base, active_per_token=12, calib_seq=64, block_out_scale=1.0)
    base = base.to(kdevice)
    ref = copy.deepcopy(base).double()
    sparse = twell.sparsify_(copy.deepcopy(base), twell.SparsityConfig(backend="triton"))
    return ref, base, sparse


def _mlp_outputs(model):
    """Records (input, output) of every gated MLP of ``model`` (hooks; returns the list and handles)."""
    seen = []
    hooks = [
        layer.mlp.register_forward_hook(lambda m, a, o: seen.append((m, a[0], o)))
        for layer in model.model.layers
    ]
    return seen, hooks


def _check_mlp_outputs(seen, what):
    for i, (mlp, x, y) in enumerate(seen):
        xd = x.double()
        g = xd @ mlp.gate_proj.weight.double().T
        h = torch.relu(g) * (xd @ mlp.up_proj.weight.double().T)
        assert_close(y, h @ mlp.down_proj.weight.double().T, name=f"{what} MLP output {i}", factor=64)


def test_kernel_path_prefill_decode_generate(kdevice):
    ref, dense, sparse = _kernel_models(kdevice)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(10)).to(kdevice)
    seen, hooks = _mlp_outputs(sparse)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = sparse(ids).logits  # M = 80 tokens: the prefill path
        _check_mlp_outputs(seen, "prefill")
        assert_close(logits, ref(ids).logits, name="prefill logits", baseline=dense(ids).logits, factor=64)
        seen.clear()
        tokens = sparse.generate(ids[:, :9], **kw)  # decode steps: M = 2
        assert len(seen) == 2 * 6
        _check_mlp_outputs(seen[-2:], "decode")
        assert torch.equal(tokens, dense.generate(ids[:, :9], **kw))
    for h in hooks:
        h.remove()


def test_kernel_path_training_gradients(kdevice):
    ref, dense, sparse = _kernel_models(kdevice)
    coeff = 3e-2
    twell.sparsify_(sparse, twell.SparsityConfig(backend="triton", l1_coeff=coeff))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(11)).to(kdevice)
    for m in (ref, dense, sparse):
        m.train()
    (sparse(ids, labels=ids).loss + twell.l1_penalty(sparse)).backward()
    _dense_loss_with_l1(ref, ids, coeff).backward()
    _dense_loss_with_l1(dense, ids, coeff).backward()
    rp, dp = dict(ref.named_parameters()), dict(dense.named_parameters())
    for name, p in sparse.named_parameters():
        assert p.grad is not None, name
        assert_close(
            p.grad, rp[name].grad, name=f"kernel-path grad {name}", baseline=dp[name].grad, factor=64
        )
