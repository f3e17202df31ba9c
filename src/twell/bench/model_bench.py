"""``twell bench model`` (prefill, decode) and ``twell bench train`` (a training step).

Both run a random-weight Llama-like model of a registry shape whose FFNs fire about ``a`` units
per token (:func:`twell.models.make_sparse_llama_`: a constant residual channel acts as the gate
bias), dense (Hugging Face MLPs, ReLU, SDPA) against the same model after :func:`twell.sparsify_`.

- model: delegates to :func:`twell.models.bench_model` (prefill ``model(ids [B, S])``; decode
  per-step time of a static-cache greedy loop, eager or replayed as a CUDA graph), then completes the rows (environment, CUDA version, measured
  roofs) and checks them against DESIGN 7.
- train: ``loss = CE + coeff * L1`` (the dense side computes the same L1 from the input of each
  ``down_proj``, so both sides pay for it), ``backward()``, ``AdamW.step()``, ``zero_grad``; the
  bound is Amdahl over the decoder's FLOPs with the FFN's training bound 18 / (2 + 16 rho);
  energy per token from NVML over about ``energy_s`` seconds of steps (CUDA).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .energy import measure_energy, open_meter
from .env import env_info, resolve_device, resolve_dtype
from .registry import MODEL_OPS, TRAIN_OPS, Case, Shape, get_shape
from .roofline import amdahl, measure_roofs, model_ffn_share
from .runner import BenchResult, check_row, default_out_path, l1_of
from .timing import percentile

__all__ = ["ModelOptions", "run_model_cases", "llama_config"]


@dataclass
class ModelOptions:
    """Knobs of the model and train modes (see :class:`twell.bench.runner.BenchOptions`)."""

    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    target_ms: float = 300.0
    warmup_ms: float = 100.0
    energy: bool = True
    energy_s: float = 1.0
    time_budget_s: float | None = None
    seed: int = 0
    l1_coeff: float = 1e-4
    lr: float = 1e-7  # tiny: the optimizer does its full work while the calibrated sparsity barely moves
    reps: int | None = None
    quick_roofs: bool = False
    #: model mode: decode steps as one captured CUDA graph each (host time out of decode)
    cuda_graph: bool = False


def llama_config(shape: Shape):
    """A ReLU ``LlamaConfig`` (SDPA attention) of a registry shape."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=shape.K,
        intermediate_size=shape.N,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads or shape.heads,
        vocab_size=shape.vocab,
        max_position_embeddings=8192,
        hidden_act="relu",
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


def _complete(row: dict, env: dict, roofs, bench: str) -> dict:
    for k in ("gpu", "cuda", "torch", "triton", "commit", "timestamp", "device"):
        row[k] = env[k]
    row["bench"] = bench
    row["roof_matmul_tflops"] = roofs.matmul_tflops
    row["roof_copy_gbps"] = roofs.copy_gbps
    for k in ("ms", "ms_p20", "ms_p80", "tokens_per_ms", "active_per_token", "bound"):
        row[k] = float(row[k])
    sp = row.get("speedup_vs_dense")
    row["speedup_vs_dense"] = float("nan") if sp is None else float(sp)
    row["achieved_over_bound"] = row["speedup_vs_dense"] / row["bound"]
    row.setdefault("peak_mem_mib", None)
    row.setdefault("energy_mj_per_token", None)
    if row["peak_mem_mib"] is not None:
        row["peak_mem_mib"] = float(row["peak_mem_mib"])
    check_row(row)
    return row


def _model_rows(case: Case, opts: ModelOptions, device, dtype) -> list[dict]:
    from twell.models import bench_model

    shape = get_shape(case.shape)
    paper = {"paper-0.5b": "0.5b", "paper-2b": "2b"}
    kw = dict(
        ops=tuple(o for o in case.ops if o in MODEL_OPS),
        batch=case.batch,
        seq=case.seq,
        decode_batches=(case.batch,),
        decode_context=case.seq,
        decode_tokens=case.new_tokens,
        active_per_token=float(case.actives[0]),
        dtype=dtype,
        device=str(device),
        providers=tuple(p for p in case.providers if p in ("dense", "twell")) or ("dense", "twell"),
        seed=opts.seed,
    )
    if opts.reps is not None:
        kw["reps"] = opts.reps
    if opts.cuda_graph:
        kw["cuda_graph"] = True
    if opts.energy:
        kw["energy_meter"] = open_meter(device)[0]
        kw["energy_s"] = opts.energy_s
    if shape.name in paper:
        rows = bench_model(paper[shape.name], **kw)
    else:
        rows = bench_model(config=llama_config(shape), **kw)
    for r in rows:
        r["shape"] = shape.name
        r["target_active"] = float(case.actives[0])
        if opts.cuda_graph and r["op"] == "decode":
            r["variant"] = "cuda-graph"
    return rows


def _train_rows(case: Case, opts: ModelOptions, device, dtype) -> list[dict]:
    from transformers import LlamaForCausalLM

    import twell
    from twell.models import make_sparse_llama_

    shape = get_shape(case.shape)
    cfg = llama_config(shape)
    torch.manual_seed(opts.seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype)
    a_target = float(case.actives[0])
    make_sparse_llama_(model, a_target, seed=opts.seed)
    model.train()
    g = torch.Generator(device="cpu").manual_seed(opts.seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (case.batch, case.seq), generator=g).to(device)
    M = case.batch * case.seq
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.0)

    dense_l1: list[torch.Tensor] = []

    def l1_hook(mod, args):
        h = args[0]
        dense_l1.append(l1_of(h))

    def step(sparse: bool):
        dense_l1.clear()
        out = model(input_ids=ids, labels=ids, use_cache=False)
        l1 = (
            twell.l1_penalty(model, opts.l1_coeff) if sparse else opts.l1_coeff * torch.stack(dense_l1).mean()
        )
        (out.loss + l1).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    results = {}
    active = None
    meter = open_meter(device)[0] if opts.energy else None
    for provider in ("dense", "twell"):
        hooks = []
        if provider == "twell":
            twell.sparsify_(model, twell.SparsityConfig(l1_coeff=opts.l1_coeff))
        else:
            twell.unsparsify_(model)
            from .capture import gated_mlps

            hooks = [m.down_proj.register_forward_pre_hook(l1_hook) for _, m in gated_mlps(model)]
        try:
            fn = lambda sparse=(provider == "twell"): step(sparse)
            times, peak = _time_steps(fn, device, opts)
            energy = None
            if meter is not None:
                e = measure_energy(meter, [fn], device, call_ms=percentile(times, 50), seconds=opts.energy_s)
                energy = e["mj_per_call"] / M
            if provider == "twell":
                st = twell.sparsity_stats(model)
                active = sum(v["l0"] for v in st.values()) / max(len(st), 1)
        finally:
            for h in hooks:
                h.remove()
        results[provider] = (times, peak, energy)
    twell.unsparsify_(model)
    a = active if active is not None else a_target
    share = model_ffn_share(
        shape.K, shape.N, shape.layers, shape.heads, shape.kv_heads, shape.vocab, case.seq // 2
    )
    bound = amdahl(share, 18.0 / (2.0 + 16.0 * a / shape.N))
    rows = []
    dense_ms = percentile(results["dense"][0], 50)
    for provider, (times, peak, energy) in results.items():
        ms = percentile(times, 50)
        rows.append(
            {
                "op": "train_step",
                "shape": shape.name,
                "K": shape.K,
                "N": shape.N,
                "M": M,
                "active_per_token": a,
                "target_active": a_target,
                "pattern": "iid",
                "provider": provider,
                "dtype": str(dtype).replace("torch.", ""),
                "ms": ms,
                "ms_p20": percentile(times, 20),
                "ms_p80": percentile(times, 80),
                "tokens_per_ms": M / ms,
                "speedup_vs_dense": dense_ms / ms,
                "bound": bound,
                "ffn_share": share,
                "peak_mem_mib": peak,
                "energy_mj_per_token": energy,
                "layers": shape.layers,
                "batch": case.batch,
                "seq": case.seq,
                "reps": len(times),
                "timing": "events-synced" if device.type == "cuda" else "wall",
            }
        )
    return rows


def _time_steps(fn, device, opts: ModelOptions) -> tuple[list[float], float | None]:
    """Per-step ms (synchronised before and after each step) and the peak memory of one step."""
    cuda = device.type == "cuda"
    fn()  # warm-up: optimizer state, kernel compilation
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    est = (time.perf_counter() - t0) * 1e3
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None
    reps = opts.reps or max(3, min(20, int(opts.target_ms / max(est, 1e-3))))
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times, peak


def run_model_cases(
    cases, opts: ModelOptions | None = None, *, bench: str = "model", out_dir=None, console=None
) -> BenchResult:
    """Runs model (``bench="model"``) or train (``bench="train"``) cases; rows as in DESIGN 7."""
    opts = opts or ModelOptions()
    if bench not in ("model", "train"):
        raise ValueError(f"bench: expected 'model' or 'train', got {bench!r}")
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    cases = list(cases)
    allowed = MODEL_OPS if bench == "model" else TRAIN_OPS
    for c in cases:
        bad = [o for o in c.ops if o not in allowed]
        if bad:
            raise ValueError(f"ops: {bad} not valid for `twell bench {bench}` (allowed: {allowed})")
    env = env_info(device)
    say = console.print if console is not None else (lambda *a, **k: None)
    say(
        f"[bold]twell bench {bench}[/bold]: {env['gpu']} | CUDA {env['cuda']} | torch {env['torch']} | "
        f"triton {env['triton']} | commit {env['commit']}"
    )
    roofs = measure_roofs(device, dtype, quick=opts.quick_roofs)
    say(f"roofs ({roofs.dtype}): matmul {roofs.matmul_tflops:.1f} TFLOP/s, copy {roofs.copy_gbps:.1f} GB/s")
    t0 = time.perf_counter()
    rows: list[dict] = []
    path = default_out_path(out_dir, bench, env) if out_dir is not None else None
    for c in cases:
        if opts.time_budget_s is not None and time.perf_counter() - t0 > opts.time_budget_s:
            say(f"[yellow]time budget reached: skipping {c.shape}[/yellow]")
            continue
        raw = _model_rows(c, opts, device, dtype) if bench == "model" else _train_rows(c, opts, device, dtype)
        new = [_complete(r, env, roofs, bench) for r in raw]
        rows += new
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with Path(path).open("a") as fh:
                for r in new:
                    fh.write(json.dumps(r, default=_json_default) + "\n")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return BenchResult(rows, env, roofs, path)


def _json_default(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)
