"""Model-level fixtures: tiny test models, a controlled-sparsity random Llama, and the model benchmark.

Random weights are not sparse (about half of the ReLU gates fire). :func:`make_sparse_llama_`
makes a random-weight Llama-like model's FFNs fire about ``active_per_token`` units per token,
without an MLP bias, as follows:

0. The residual stream is made to be dominated by the token embedding: embeddings are redrawn
   with std ``embed_std`` (1.0) and the ``o_proj``/``down_proj`` weights are scaled by
   ``block_out_scale`` (0.05). Step 2's rule thresholds the raw residual's dot product, whose scale
   otherwise varies with position and depth (HF's random attention outputs are ~40x the 0.02-std
   embeddings at K = 2048, larger for early positions): with raw random-init weights the measured
   count drifted from 35 to 56 over 4 layers (target 30, tiny model, CPU) and more at shorter sequences.
1. Residual channel ``c`` carries a constant: the embedding column ``c`` is set to ``value`` and the
   rows ``c`` of every ``o_proj`` and ``down_proj`` are zeroed, so no block writes that channel and
   it stays exactly ``value`` in every layer's residual stream.
2. After RMSNorm, ``x[c] = value * w_norm[c] / rms(x) > 0``; the sign of a gate pre-activation
   ``g_n = x[c] * W_gate[n, c] + sum_{i != c} x[i] W_gate[n, i]`` is unchanged by the positive
   factor ``1/rms``, so unit ``n`` fires iff ``r_n = (sum_{i != c} x[i] W_gate[n, i]) / x[c] > -W_gate[n, c]``.
3. A forward pass on calibration tokens, with a pre-hook on each MLP that runs before the MLP
   itself, sets ``W_gate[n, c] = -quantile_{1 - a/N}(r_n)`` from that layer's actual inputs, so each
   unit fires on a fraction ``a/N`` of tokens ("iid" pattern); later layers are calibrated on the
   outputs of the already-sparse earlier ones.

Measured on CPU (bf16, K = 2048, N = 5632, vocab 49152, 3 layers, target 30, default calibration
of 8 x 512 tokens): 30.1-30.2 active units per layer on fresh 2 x 256-token inputs, 30.2-30.9 on
2 x 32-token inputs.

The same model then serves as the dense baseline (plain HF MLPs, ReLU, SDPA attention) and, after
:func:`twell.sparsify_`, as the sparse model: identical weights and outputs.

Legend: K = hidden_size, N = intermediate_size, a = active units per token, B = batch, S = sequence.
"""

from __future__ import annotations

import datetime
import inspect
import os
import subprocess

import torch
from torch import nn

from ..convert import find_gated_mlps, sparsify_, unsparsify_

__all__ = [
    "PAPER_SHAPES",
    "paper_config",
    "tiny_llama_config",
    "make_sparse_llama_",
    "measure_active_units",
    "bench_model",
    "model_bound",
]

#: the paper's model shapes (hidden 2048, FFN 5632, 32 heads, vocab 49152)
PAPER_SHAPES = {
    "0.5b": dict(num_hidden_layers=8),
    "2b": dict(num_hidden_layers=38),
}


def paper_config(shape: str, **overrides):
    """``LlamaConfig`` of the paper's ``"0.5b"`` (8 layers) or ``"2b"`` (38 layers) model: hidden 2048,
    FFN 5632, 32 heads (MHA), vocab 49152, ReLU, SDPA attention."""
    from transformers import LlamaConfig

    if shape not in PAPER_SHAPES:
        raise ValueError(f"shape: expected one of {sorted(PAPER_SHAPES)}, got {shape!r}")
    args = dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=49152,
        max_position_embeddings=4096,
        hidden_act="relu",
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        **PAPER_SHAPES[shape],
    )
    args.update(overrides)
    return LlamaConfig(**args)


def tiny_llama_config(**overrides):
    """A tiny ReLU ``LlamaConfig`` for CPU tests: hidden 64, FFN 160, 2 layers, 4 heads (2 KV), vocab 128."""
    from transformers import LlamaConfig

    args = dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        hidden_act="relu",
        attn_implementation="sdpa",
    )
    args.update(overrides)
    return LlamaConfig(**args)


def _decoder_layers(model: nn.Module):
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(
            f"model: {type(model).__name__} has no .model.layers (a Llama-like decoder is needed)"
        )
    return layers


@torch.no_grad()
def make_sparse_llama_(
    model: nn.Module,
    active_per_token: float = 30.0,
    *,
    channel: int = 0,
    value: float | None = None,
    embed_std: float = 1.0,
    block_out_scale: float = 0.05,
    calib_batch: int = 8,
    calib_seq: int = 512,
    seed: int = 0,
) -> nn.Module:
    """Makes, in place, each FFN of a random-weight Llama-like model fire about ``active_per_token``
    of its N units per token (each unit with probability a/N), as described in the module docstring.

    Args:
        model: a ``*ForCausalLM`` with ``.model.embed_tokens``, ``.model.layers[i].self_attn.o_proj``
            and gated MLPs (dense HF or already sparsified), RMSNorm weights > 0 at ``channel``.
        active_per_token: target a, 0 < a < N.
        channel: the residual channel that carries the constant.
        value: that constant; default: the mean L2 norm of the embedding rows (half the energy).
        embed_std, block_out_scale: step 0 (embedding std; factor on o_proj/down_proj weights).
        calib_batch, calib_seq: size of the random-token calibration batch (B x S tokens).

    Returns:
        ``model``. The per-layer count reached on fresh tokens is :func:`measure_active_units`'s.
    """
    layers = _decoder_layers(model)
    mlps = [m for _, m in find_gated_mlps(model)]
    if len(mlps) != len(layers):
        raise ValueError(f"model: found {len(mlps)} gated MLPs for {len(layers)} layers")
    emb = model.get_input_embeddings().weight
    K = emb.shape[1]
    N = mlps[0].gate_proj.weight.shape[0]
    if not 0 < active_per_token < N:
        raise ValueError(f"active_per_token: must be in (0, N={N}), got {active_per_token}")
    if not 0 <= channel < K:
        raise ValueError(f"channel: must be in [0, K={K}), got {channel}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    emb.copy_(torch.randn(emb.shape, generator=g) * embed_std)
    if value is None:
        value = float(emb.float().norm(dim=1).mean())
    emb[:, channel] = value
    for layer in layers:
        for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
            w.mul_(block_out_scale)
            w[channel, :] = 0
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if float(norm.weight[channel]) <= 0:
                norm.weight[channel] = 1.0
    T = calib_batch * calib_seq
    # The k-th smallest of T samples leaves an expected fraction (T + 1 - k) / (T + 1) above it, so
    # k = (T + 1)(1 - a/N), interpolated between neighbours; ceil((1 - a/N) T) instead gave 33 units
    # for a target of 30 (T = 512, N = 5632): the rank step is N / (T + 1) units.
    kf = min(max((T + 1) * (1.0 - active_per_token / N), 1.0), float(T))
    k0 = int(kf)
    frac = kf - k0

    def calibrate(mod, args):
        x = args[0].reshape(-1, K).float()
        w = mod.gate_proj.weight
        wf = w.float()
        v = x[:, channel]
        rest = x @ wf.t() - v[:, None] * wf[:, channel][None, :]  # [T, N]
        r = rest / v[:, None]
        lo = r.kthvalue(k0, dim=0).values  # [N]
        hi = r.kthvalue(min(k0 + 1, T), dim=0).values if frac > 0 else lo
        thr = lo + frac * (hi - lo)
        w[:, channel] = (-thr).to(w.dtype)

    hooks = [m.register_forward_pre_hook(calibrate) for m in mlps]
    try:
        ids = torch.randint(0, emb.shape[0], (calib_batch, calib_seq), generator=g).to(emb.device)
        model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return model


@torch.no_grad()
def measure_active_units(model: nn.Module, input_ids: torch.Tensor) -> list[float]:
    """Mean number of units with a positive gate per token, per gated MLP, on ``input_ids [B, S]``."""
    mlps = [m for _, m in find_gated_mlps(model)]
    out: list[torch.Tensor] = []

    def count(mod, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        out.append((torch.nn.functional.linear(x, mod.gate_proj.weight) > 0).sum(-1).float().mean())

    hooks = [m.register_forward_pre_hook(count) for m in mlps]
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [float(v) for v in out]


# -- benchmark ---------------------------------------------------------------------------------------


def model_bound(config, op: str, batch: int, seq: int, active: float, context: int = 0) -> float:
    """Ideal whole-model speedup of the sparse FFN over dense (Amdahl over the model's work).

    prefill: FLOP ratio per token, dense ``8K^2``-ish attention projections + ``2 S K`` causal
    attention + ``6 K N`` FFN vs sparse FFN ``2 K N + 4 K a`` (lm_head on the last token only).
    decode: bytes-read ratio per step: all weights + KV cache (+ lm_head) vs gate ``K N`` plus the
    batch union ``2 K N (1 - (1 - a/N)^B)`` of up/down rows.
    """
    K, N, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    H = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or K // H
    kv = config.num_key_value_heads * hd
    attn_w = K * (H * hd + 2 * kv) + H * hd * K
    if op == "prefill":
        attn = 2 * attn_w + 2 * seq * H * hd  # causal QK^T and PV: 2 * (2 S d) / 2 per token
        dense = L * (attn + 6 * K * N)
        sparse = L * (attn + 2 * K * N + 4 * K * active)
    elif op == "decode":
        union = 1.0 - (1.0 - active / N) ** batch
        fixed = L * (attn_w + 2 * batch * context * kv) + K * config.vocab_size
        dense = fixed + L * 3 * K * N
        sparse = fixed + L * (K * N + 2 * K * N * union)
    else:
        raise ValueError(f"op: expected 'prefill' or 'decode', got {op!r}")
    return dense / sparse


def _env(device) -> dict:
    gpu = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "none"
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton_v,
        "commit": commit or "unknown",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _time(fn, device, warmup: int, reps: int) -> list[float]:
    """Milliseconds per call of ``fn`` after ``warmup`` calls (CUDA events on GPU, wall clock elsewhere)."""
    from ..bench.timing import synced_ms

    for _ in range(warmup):
        fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return synced_ms(fn, device, reps)


def _quantiles(ts: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(ts, dtype=torch.float64)
    return float(t.quantile(0.5)), float(t.quantile(0.2)), float(t.quantile(0.8))


def _prefill_fn(model, ids):
    kw = {"use_cache": False}
    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    elif "num_logits_to_keep" in params:
        kw["num_logits_to_keep"] = 1

    def run():
        with torch.inference_mode():
            model(input_ids=ids, **kw)

    return run


def _decode_fn(model, ids, steps: int, cuda_graph: bool):
    """``run()``: ``steps`` greedy decode steps of ``B`` tokens after prefilling ``ids [B, S]`` into a
    static cache (positions ``S .. S + steps - 1``, rewritten by every call).

    Each step is ``model(tok [B, 1], cache_position=pos)`` and an argmax into ``tok``; with
    ``cuda_graph`` (CUDA) one step is captured once (after one eager warm-up pass on a side
    stream) and replayed, so host time stops counting: the regime of a served model.
    """
    from transformers import StaticCache

    B, S = ids.shape
    dev = ids.device
    L = S + steps + 1
    with torch.inference_mode():
        cache = StaticCache(config=model.config, max_cache_len=L)
        # all ones: the causal rule on cache_position masks the unwritten slots of the cache
        mask = torch.ones(B, L, dtype=torch.long, device=dev)
        out = model(
            input_ids=ids,
            attention_mask=mask[:, :S],
            past_key_values=cache,
            cache_position=torch.arange(S, device=dev),
            logits_to_keep=1,
        )
        tok = out.logits[:, -1:].argmax(-1)
        pos = torch.full((1,), S, dtype=torch.long, device=dev)

    def rewind():
        # back to S written positions; newer transformers' static layers count writes in a
        # tensor of their own instead of reading cache_position
        pos.fill_(S)
        for layer in getattr(cache, "layers", ()):
            n = getattr(layer, "cumulative_length", None)
            if isinstance(n, torch.Tensor):
                n.fill_(S)
            elif n is not None:
                layer.cumulative_length = S

    def step(m):
        o = model(
            input_ids=tok, attention_mask=m, past_key_values=cache, cache_position=pos, logits_to_keep=1
        )
        tok.copy_(o.logits[:, -1:].argmax(-1))
        pos.add_(1)

    def eager():
        # eager steps pass the mask of the positions written so far: transformers then masks the
        # rest of the static cache itself (an all-ones mask would let it skip the mask at 1 query)
        with torch.inference_mode():
            rewind()
            for i in range(steps):
                step(mask[:, : S + i + 1])

    eager.last = tok  # the token of the last step (tests)
    if not (cuda_graph and dev.type == "cuda"):
        return eager
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side), torch.inference_mode():
        eager()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode():
        rewind()
        with torch.cuda.graph(graph):
            # while capturing, transformers builds the mask from cache_position (the causal rule
            # hides the unwritten slots) without reading the mask's values
            step(mask)

    def replay():
        with torch.inference_mode():
            rewind()
            for _ in range(steps):
                graph.replay()

    replay.last = tok
    return replay


def bench_model(
    shape: str = "0.5b",
    *,
    ops: tuple[str, ...] = ("prefill", "decode"),
    batch: int = 16,
    seq: int = 2048,
    decode_batches: tuple[int, ...] = (1, 8),
    decode_context: int = 512,
    decode_tokens: int = 32,
    active_per_token: float = 30.0,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    providers: tuple[str, ...] = ("dense", "twell"),
    cuda_graph: bool = False,
    energy_meter=None,
    energy_s: float = 1.0,
    warmup: int = 2,
    reps: int = 10,
    config=None,
    seed: int = 0,
) -> list[dict]:
    """Benchmarks dense HF (SDPA, ReLU MLPs) against the same model after :func:`twell.sparsify_`.

    The model is a random-weight Llama of the paper's ``shape`` (or ``config``) made sparse by
    :func:`make_sparse_llama_`. Prefill: ``model(ids [batch, seq])`` with ``logits_to_keep=1``,
    ``M = batch * seq``. Decode: per step time of ``decode_tokens`` greedy steps at each batch in
    ``decode_batches`` after a ``decode_context``-token prompt, with a static KV cache, ``M = batch``
    (the model's own forward in a loop, not ``generate``, whose per-call set-up would count). Eager
    decode of a small model is bound by Python and kernel-launch overhead, not by the weight reads
    the FFN saves; with ``cuda_graph=True`` (CUDA) each step is one captured CUDA graph replayed,
    which takes host time out and shows the GPU-side gain. With ``energy_meter`` (a
    :class:`twell.bench.energy.EnergyMeter`) each case also runs about ``energy_s`` seconds of calls
    for ``energy_mj_per_token`` (prefill: per prompt token; decode: per generated token).

    Returns:
        One dict per (op, batch, provider) in the benchmark row schema (DESIGN section 7), with
        extra fields ``layers``, ``batch``, ``seq``, ``context``, ``cache``, ``cuda_graph``,
        ``active_per_layer``.
    """
    from transformers import LlamaForCausalLM

    for p in providers:
        if p not in ("dense", "twell"):
            raise ValueError(f"providers: expected 'dense' and/or 'twell', got {p!r}")
    for op in ops:
        if op not in ("prefill", "decode"):
            raise ValueError(f"ops: expected 'prefill' and/or 'decode', got {op!r}")
    cfg = config if config is not None else paper_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype).eval()
    make_sparse_llama_(model, active_per_token, seed=seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    V = cfg.vocab_size
    measured = measure_active_units(model, torch.randint(0, V, (2, min(seq, 512)), generator=g).to(device))
    a = sum(measured) / len(measured)
    env = _env(device)
    shape_name = f"paper-{shape}" if config is None else f"custom-{cfg.hidden_size}x{cfg.intermediate_size}"
    cases = []
    if "prefill" in ops:
        cases.append(("prefill", batch, seq))
    if "decode" in ops:
        cases += [("decode", b, decode_context) for b in decode_batches]
    inputs = {(op, b, s): torch.randint(0, V, (b, s), generator=g).to(device) for op, b, s in cases}
    results: dict[tuple, dict] = {}
    for provider in providers:
        if provider == "twell":
            sparsify_(model)
        else:
            unsparsify_(model)
        for op, b, s in cases:
            ids = inputs[(op, b, s)]
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(device)
            if op == "prefill":
                run = _prefill_fn(model, ids)
                calls = _time(run, device, warmup, reps)
                ts, M, tokens = calls, b * s, b * s
            else:
                run = _decode_fn(model, ids, decode_tokens, cuda_graph)
                calls = _time(run, device, warmup, reps)
                ts, M, tokens = [t / decode_tokens for t in calls], b, b * decode_tokens
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.startswith("cuda") else None
            energy = None
            if energy_meter is not None:
                from ..bench.energy import measure_energy

                e = measure_energy(
                    energy_meter, [run], device, call_ms=_quantiles(calls)[0], seconds=energy_s
                )
                energy = e["mj_per_call"] / tokens
            # the static cache and the graph's pool go now: kept until the next decode case, they
            # counted in the peak memory of the cases between
            del run
            ms, p20, p80 = _quantiles(ts)
            results[(op, b, provider)] = dict(
                bench="model",
                op=op,
                shape=shape_name,
                K=cfg.hidden_size,
                N=cfg.intermediate_size,
                M=M,
                active_per_token=a,
                pattern="iid",
                provider=provider,
                dtype=str(dtype).replace("torch.", ""),
                ms=ms,
                ms_p20=p20,
                ms_p80=p80,
                tokens_per_ms=M / ms if ms > 0 else float("inf"),
                peak_mem_mib=peak,
                energy_mj_per_token=energy,
                layers=cfg.num_hidden_layers,
                batch=b,
                seq=s if op == "prefill" else 1,
                context=0 if op == "prefill" else s,
                cache="static" if op == "decode" else None,
                cuda_graph=cuda_graph and op == "decode",
                active_per_layer=measured,
                **env,
            )
    unsparsify_(model)
    rows = []
    for (op, b, provider), row in results.items():
        dense = results.get((op, b, "dense"))
        bound = 1.0 if provider == "dense" else model_bound(cfg, op, b, row["seq"], a, row["context"])
        speed = dense["ms"] / row["ms"] if dense is not None and row["ms"] > 0 else None
        row["speedup_vs_dense"] = speed
        row["bound"] = bound
        row["achieved_over_bound"] = speed / bound if speed is not None else None
        rows.append(row)
    return rows
