"""The training loop: ``loss = CE + coeff(step) * L1`` on Hugging Face ``accelerate`` (one process,
DDP or FSDP, as launched), with exact resume and per-step sparsity logging.

Batch legend: B = micro_batch_size, A = grad_accum, W = processes, L = seq_len. One optimizer step
consumes ``A * W * B`` blocks of L tokens, drawn by every process from the same seeded stream;
process r, micro-step a takes blocks ``[(a * W + r) * B, (a * W + r + 1) * B)``. So a run on W
processes with A micro-steps sees the same batches as one process with ``A * W`` micro-steps, and
their losses agree up to float rounding.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TrainConfig
from .data import DataBundle, build_data
from .model import build_model, count_parameters, sparse_mlps
from .schedule import l1_coeff_at, make_lr_scheduler
from .tracking import MetricsLog, environment, plot_run

__all__ = ["TrainResult", "train", "evaluate", "latest_checkpoint"]


@dataclass
class TrainResult:
    """What :func:`train` returns: the step records, the final evaluation and where things were written."""

    history: list[dict]
    final_eval: dict | None
    output_dir: Path
    model: torch.nn.Module
    tokenizer: object
    info: dict = field(default_factory=dict)


class _RunState:
    """Checkpointed progress: step, tokens, and the dead-unit window (summed over processes)."""

    def __init__(self, num_layers: int, num_units: int):
        self.step = 0
        self.tokens = 0
        self.window_tokens = 0
        self.window_counts = torch.zeros(num_layers, num_units, dtype=torch.int64)
        self.restored = False

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "window_tokens": self.window_tokens,
            "window_counts": self.window_counts.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.window_tokens = int(state["window_tokens"])
        self.window_counts = state["window_counts"].clone()
        self.restored = True


def latest_checkpoint(output_dir) -> Path | None:
    """The newest ``checkpoints/step_*`` folder of a run, or None."""
    ckpts = sorted(Path(output_dir, "checkpoints").glob("step_*"))
    return ckpts[-1] if ckpts else None


def _precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if torch.cuda.is_available() and not cfg.cpu else "no"


def _trackers(cfg: TrainConfig) -> list[str]:
    import importlib.util

    if cfg.trackers == "none":
        return []
    if cfg.trackers == "auto":
        # wandb needs an account, so only an explicit --trackers wandb turns it on.
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []
    names = [t.strip() for t in cfg.trackers.split(",") if t.strip()]
    for t in names:
        mod = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(t)
        if mod is None:
            raise ValueError(
                f"trackers: expected auto, none or a list of tensorboard/wandb, got {cfg.trackers!r}"
            )
        if importlib.util.find_spec(mod) is None:
            raise ImportError(f"trackers: {t} is not installed (pip install {mod})")
    return names


def _peak_mem_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB of peak RSS


def evaluate(model, val: torch.Tensor, batch_size: int, accelerator) -> dict:
    """Validation over ``val [V, L]`` (split across processes): mean next-token CE (nats),
    perplexity, active units per token (mean and per layer) and the fraction of units that never
    fired on these tokens (mean and per layer). A model with dense MLPs is sparsified for the
    measurement (same weights, torch reference path) and restored afterwards."""
    import twell

    raw = accelerator.unwrap_model(model)
    mlps = sparse_mlps(raw)
    temporary = not mlps
    if temporary:
        twell.sparsify_(raw, twell.SparsityConfig(backend="reference", force_relu=True))
        mlps = sparse_mlps(raw)
    saved = [(m.track_unit_counts, m.unit_counts.clone(), m.tokens_seen) for m in mlps]
    for m in mlps:  # count on the validation tokens alone; the training window is restored below
        m.track_unit_counts = True
        m.reset_unit_counts()
    was_training = model.training
    model.eval()
    shard = val[accelerator.process_index :: accelerator.num_processes]
    device = accelerator.device
    totals = torch.zeros(
        3 + len(mlps), dtype=torch.float64, device=device
    )  # CE sum, predicted, tokens, l0 sums
    try:
        with torch.no_grad():
            for i in range(0, shard.shape[0], batch_size):
                ids = shard[i : i + batch_size].to(device)
                with accelerator.autocast():
                    out = model(input_ids=ids, labels=ids)
                n = ids.shape[0] * (ids.shape[1] - 1)  # predicted positions
                totals[0] += out.loss.double() * n
                totals[1] += n
                totals[2] += ids.numel()
                totals[3:] += torch.stack([m.last_stats.l0.double() for m in mlps]) * ids.numel()
        counts = torch.stack([m.unit_counts.to(device) for m in mlps])
    finally:
        for m, (track, c, seen) in zip(mlps, saved):
            m.track_unit_counts = track
            m.unit_counts.copy_(c)
            m.tokens_seen = seen
        if temporary:
            twell.unsparsify_(raw)
        model.train(was_training)
    totals = accelerator.reduce(totals, "sum")
    counts = accelerator.reduce(counts, "sum")
    if totals[1] == 0:
        return {}
    ce = float(totals[0] / totals[1])
    per_layer = (totals[3:] / totals[2]).tolist()
    never = (counts == 0).double().mean(dim=1).tolist()
    return {
        "val_ce": ce,
        "val_ppl": math.exp(min(ce, 50.0)),
        "val_tokens": int(totals[2]),
        "val_active": sum(per_layer) / len(per_layer),
        "val_active_per_layer": per_layer,
        "val_never_active": sum(never) / len(never),
        "val_never_active_per_layer": never,
    }


def _optimizer(model, cfg: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    # Weight decay on matrices and embeddings only, not on norm gains (the HF Trainer's split).
    decay, no_decay = [], []
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all tensors; on CPU 2.6 ms vs 510 ms per step for the tiny preset's
    # 5.3 M parameters (2 cores), where the default per-tensor loop took 10% of a step.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def _console_line(r: dict) -> str:
    dead = "-" if r.get("dead_frac") is None else f"{100 * r['dead_frac']:.1f}%"
    sparsity = ""
    if r.get("active_mean") is not None:
        sparsity = (
            f"l1 {r['l1']:.4g}  coeff {r['l1_coeff']:.3g}  active/token {r['active_mean']:.1f} "
            f"[{r['active_min']:.1f}..{r['active_max']:.1f}]  dead {dead}  "
        )
    return (
        f"step {r['step']:>6}  ce {r['ce']:.4f}  {sparsity}lr {r['lr']:.3g}  "
        f"{r['tokens_per_s']:.0f} tok/s  mem {r['peak_mem_mib']:.0f} MiB"
    )


def _small_calls_note(tokens_per_call: int, device: torch.device, cfg: TrainConfig) -> str | None:
    """A warning when every FFN call of a sparse run is too small for the training kernels: on
    CUDA the training op runs its dense path below ``TrainConfig.dense_below_m`` tokens per call
    (``twell.ops.ffn_train``), whatever the density. None when the kernels can run."""
    if device.type != "cuda" or not cfg.sparse_mlp or cfg.backend == "reference":
        return None
    from ..ops import ffn_train as ft

    need = ft.CONFIG.dense_below_m
    if tokens_per_call >= need:
        return None
    return (
        f"each FFN call sees {tokens_per_call:,} tokens (micro_batch_size x seq_len), below the "
        f"{need:,} from which the training kernels run: every call takes the dense path "
        "(statistics and L1 included). Raise --micro-batch-size (and lower --grad-accum to keep "
        "the batch) for the sparse kernels' speed"
    )


def train(cfg: TrainConfig, *, console=None, data: DataBundle | None = None) -> TrainResult:
    """Train ``cfg`` to ``cfg.max_steps`` (resuming first if ``cfg.resume``); see the module docstring.

    Writes under ``cfg.output_dir``: ``metrics.jsonl``, ``checkpoints/step_N/`` (every
    ``save_every`` steps), ``final/`` (``save_pretrained`` model + tokenizer), ``loss.png`` and
    ``sparsity.png``. Call it in every process of an ``accelerate launch``.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from rich.console import Console

    import twell

    accelerator = Accelerator(
        # without CUDA, only cpu=True makes accelerate join a multi-process (gloo) launch
        cpu=cfg.cpu or not torch.cuda.is_available(),
        mixed_precision=_precision(cfg),
        log_with=_trackers(cfg) or None,
        project_dir=cfg.output_dir,
        step_scheduler_with_optimizer=False,
        # SparseGatedMLP.unit_counts is a per-process buffer: DDP must not overwrite it from rank 0.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    main = accelerator.is_main_process
    console = console or Console()
    say = (lambda *a, **k: console.print(*a, soft_wrap=True, **k)) if main else (lambda *a, **k: None)
    out = Path(cfg.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)

    data = data or build_data(cfg, accelerator.main_process_first)
    tok = data.tokenizer
    model = build_model(cfg, len(tok), data.info["eos"])
    mlps = sparse_mlps(model)
    if cfg.sparse_mlp and not mlps:
        raise ValueError("model: no sparse MLP after sparsify_ (not a gated-MLP decoder?)")
    n_units = int(model.config.intermediate_size)
    n_layers = int(model.config.num_hidden_layers)
    n_params = count_parameters(model)
    from accelerate.utils import DistributedType

    # FSDP shards parameters into DTensors/flat params: keep torch's default implementation there
    optimizer = _optimizer(model, cfg, fused=accelerator.distributed_type != DistributedType.FSDP)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    mlps = sparse_mlps(raw)
    scheduler = make_lr_scheduler(getattr(optimizer, "optimizer", optimizer), cfg.warmup_steps, cfg.max_steps)
    state = _RunState(n_layers, n_units)
    accelerator.register_for_checkpointing(scheduler, data.train, state)

    W, A, B, L = accelerator.num_processes, cfg.grad_accum, cfg.micro_batch_size, cfg.seq_len
    rank = accelerator.process_index
    log = MetricsLog(out / "metrics.jsonl", enabled=main)
    header = {
        "event": "start",
        "step": 0,
        "config": cfg.to_dict(),
        "env": environment(),
        "processes": W,
        "distributed": str(accelerator.distributed_type),
        "precision": accelerator.mixed_precision,
        "params": n_params,
        "tokens_per_step": A * W * B * L,
        "data": data.info,
    }
    history: list[dict] = []
    if cfg.resume:
        ckpt = latest_checkpoint(out) if cfg.resume == "latest" else Path(cfg.resume)
        if ckpt is None or not ckpt.is_dir():
            raise ValueError(f"resume: no checkpoint at {cfg.resume!r} (output_dir={out})")
        accelerator.load_state(str(ckpt))
        for m, counts in zip(mlps, state.window_counts):
            # the window's counts were summed over processes at save time: keep them on one process only
            m.unit_counts.copy_(counts.to(m.unit_counts.device) if main else torch.zeros_like(counts))
        history = [r for r in log.truncate_after(state.step) if r.get("event") in ("train", "eval")]
        log.write({"event": "resume", "step": state.step, "checkpoint": str(ckpt), "env": header["env"]})
        say(f"[bold]resumed[/] from {ckpt} at step {state.step}")
    else:
        if main and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
        log.write(header)
    if accelerator.log_with:
        flat = {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()
        }
        accelerator.init_trackers("twell-train", config=flat)

    say(
        f"[bold]twell train[/]: {n_params / 1e6:.2f} M params, {n_layers} {'sparse' if mlps else 'dense'} FFNs "
        f"of {n_units} units, "
        f"{A * W * B * L:,} tokens/step ({W} process(es) x {A} accum x {B} x {L}), {cfg.max_steps} steps, "
        f"L1 {cfg.l1_coeff:g} ({cfg.l1_schedule}; paper convention {cfg.paper_l1_coeff:.3g}), "
        f"{accelerator.mixed_precision} on {accelerator.device}"
    )
    if data.val is None:
        say("[yellow]no validation blocks: evaluation is skipped[/]")
    note = _small_calls_note(B * L, accelerator.device, cfg)
    if note:
        say(f"[yellow]{note}[/]")

    progress = None
    if main and cfg.progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=console, transient=False,
        )  # fmt: skip
        task = progress.add_task("train", total=cfg.max_steps, completed=state.step, info="")
        progress.start()

    def save_checkpoint() -> None:
        if mlps:
            counts = torch.stack([m.unit_counts for m in mlps])
            state.window_counts = accelerator.reduce(counts, "sum").cpu()
        path = out / "checkpoints" / f"step_{state.step:07d}"
        accelerator.save_state(str(path), safe_serialization=False)
        say(f"saved checkpoint {path}")

    model.train()
    device = accelerator.device
    last_dead: tuple[float, list[float]] | None = None
    try:
        while state.step < cfg.max_steps:
            t0 = time.perf_counter()
            coeff = l1_coeff_at(
                state.step, cfg.l1_coeff, cfg.l1_schedule, cfg.l1_warmup_steps, cfg.l1_delay_steps
            )
            lr = scheduler.get_last_lr()[0]
            blocks = data.train.next(A * W * B)
            # per-step sums over micro-steps: ce, l1 statistic, overflow rows, then per-layer active units
            acc = torch.zeros(3 + len(mlps), dtype=torch.float32, device=device)
            for a in range(A):
                lo = (a * W + rank) * B
                ids = blocks[lo : lo + B].to(device, non_blocking=True)
                sync = contextlib.nullcontext() if a == A - 1 else accelerator.no_sync(model)
                with sync:
                    out_ = model(input_ids=ids, labels=ids)
                    loss = out_.loss
                    if coeff > 0:
                        loss = loss + twell.l1_penalty(raw, coeff)
                    accelerator.backward(loss / A)
                with torch.no_grad():
                    acc[0] += out_.loss.detach().float()
                    if mlps:
                        stats = [m.last_stats for m in mlps]
                        acc[1] += torch.stack([s.l1.detach() for s in stats]).mean().float()
                        acc[2] += sum(s.overflow_rows for s in stats).float()
                        acc[3:] += torch.stack([s.l0.float() for s in stats])
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            acc = accelerator.reduce(acc, "mean") / A
            acc[2] *= W * A  # overflow rows: a count, summed over processes and micro-steps
            state.step += 1
            state.tokens += A * W * B * L
            state.window_tokens += A * W * B * L
            if mlps and state.window_tokens >= cfg.dead_window_tokens:
                counts = accelerator.reduce(torch.stack([m.unit_counts for m in mlps]), "sum")
                dead = (counts == 0).float().mean(dim=1).tolist()
                last_dead = (sum(dead) / len(dead), dead)
                for m in mlps:
                    m.reset_unit_counts()
                state.window_tokens = 0
            vals = acc.tolist()
            per_layer = vals[3:] or None
            dt = time.perf_counter() - t0
            rec = {
                "event": "train",
                "step": state.step,
                "tokens": state.tokens,
                "ce": vals[0],
                "l1": vals[1] if mlps else None,
                "l1_coeff": coeff,
                "l1_loss": coeff * vals[1],
                "loss": vals[0] + coeff * vals[1],
                "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "active_mean": sum(per_layer) / len(per_layer) if per_layer else None,
                "active_min": min(per_layer) if per_layer else None,
                "active_max": max(per_layer) if per_layer else None,
                "active_per_layer": per_layer,
                "zeros_pct": 100.0 * (1.0 - sum(per_layer) / len(per_layer) / n_units) if per_layer else None,
                "overflow_rows": vals[2] if mlps else None,
                "dead_frac": None if last_dead is None else last_dead[0],
                "dead_per_layer": None if last_dead is None else last_dead[1],
                "tokens_per_s": A * W * B * L / dt,
                "step_time_s": dt,
                "peak_mem_mib": _peak_mem_mib(device),
            }
            history.append(rec)
            log.write(rec)
            if accelerator.log_with:
                accelerator.log(
                    {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"},
                    step=state.step,
                )
            if progress is not None:
                info = f"ce {rec['ce']:.3f}"
                if per_layer:
                    info += f" l1 {rec['l1']:.3g} active {rec['active_mean']:.1f}/{n_units}"
                progress.update(task, completed=state.step, info=info)
            if main and (state.step % cfg.log_every == 0 or state.step == cfg.max_steps):
                say(_console_line(rec))
            last = state.step == cfg.max_steps
            if data.val is not None and ((cfg.eval_every and state.step % cfg.eval_every == 0) or last):
                ev = {"event": "eval", "step": state.step, "tokens": state.tokens}
                ev.update(evaluate(model, data.val, B, accelerator))
                history.append(ev)
                log.write(ev)
                if accelerator.log_with:
                    accelerator.log({k: ev[k] for k in ("val_ce", "val_ppl")}, step=state.step)
                say(
                    f"step {state.step:>6}  [bold]validation[/] ce {ev['val_ce']:.4f}  ppl {ev['val_ppl']:.2f}  "
                    f"active/token {ev['val_active']:.1f}  never active {100 * ev['val_never_active']:.1f}%"
                )
            if cfg.save_every and state.step % cfg.save_every == 0:
                save_checkpoint()
    finally:
        if progress is not None:
            progress.stop()

    final_eval = next((r for r in reversed(history) if r.get("event") == "eval"), None)
    accelerator.wait_for_everyone()
    if cfg.save_final:
        final_dir = out / "final"
        state_dict = accelerator.get_state_dict(model)
        if main:
            raw.save_pretrained(final_dir, state_dict=state_dict)
            tok.save_pretrained(final_dir)
            say(f"saved model + tokenizer to {final_dir}")
    if main:
        log.write({"event": "end", "step": state.step, "tokens": state.tokens, "final_eval": final_eval})
        if cfg.plots:
            for p in plot_run(history, out, n_units):
                say(f"plot: {p}")
    accelerator.end_training()
    return TrainResult(
        history=history,
        final_eval=final_eval,
        output_dir=out,
        model=raw,
        tokenizer=tok,
        info={"params": n_params, "processes": W, "data": data.info, "intermediate_size": n_units},
    )
