"""``twell bench {kernels,model,train,report}``.

Every run prints ``GPU | CUDA | torch | triton | commit`` and the measured roofs first, then a
table, and appends JSON rows (DESIGN section 7) to ``<out>/<mode>-<device>-<time>.jsonl``.
``twell bench report`` renders BENCHMARKS.md tables and PNG plots from those files.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]

_OP_ALIASES = {
    "fwd": "ffn_fwd",
    "ffn_fwd": "ffn_fwd",
    "fwdbwd": "ffn_fwdbwd",
    "ffn_fwdbwd": "ffn_fwdbwd",
    "prefill": "prefill",
    "decode": "decode",
    "train-step": "train_step",
    "train_step": "train_step",
}


def _common(p: argparse.ArgumentParser, default_preset: str) -> None:
    p.add_argument("--preset", default=default_preset, help=f"registered preset (default {default_preset})")
    p.add_argument(
        "--shape",
        nargs="+",
        default=None,
        help="registered shape(s) or KxN; replaces the preset's shapes (its M, active units, batch and seq stay)",
    )
    p.add_argument("--M", nargs="+", type=int, default=None, help="tokens per call (kernels) / total tokens")
    p.add_argument("--active", nargs="+", type=float, default=None, help="target active units per token")
    p.add_argument("--pattern", nargs="+", default=None, help="iid, skewed, heavy")
    p.add_argument("--ops", nargs="+", default=None, help="fwd, fwdbwd, prefill, decode, train-step")
    p.add_argument("--providers", nargs="+", default=None, help="dense (always run), twell, reference")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="bfloat16 (CUDA default), float16, float32 (CPU default)")
    p.add_argument("--target-ms", type=float, default=300.0, help="time spent per timed method per row (ms)")
    p.add_argument("--warmup-ms", type=float, default=100.0, help="warm-up per row (ms)")
    p.add_argument("--no-energy", action="store_true", help="skip NVML energy")
    p.add_argument(
        "--energy-s", type=float, default=1.0, help="seconds of calls per energy reading (default 1)"
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="stop starting rows after this many seconds (default: the preset's; h100: 230)",
    )
    p.add_argument(
        "--out", default="benchmarks/results", help="directory for the JSON rows (default benchmarks/results)"
    )
    p.add_argument("--no-save", action="store_true", help="print only, write no JSON rows")
    p.add_argument("--seed", type=int, default=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_mode", metavar="MODE")
    k = sub.add_parser("kernels", help="FFN forward / forward+backward against dense, across M and sparsity")
    _common(k, "tiny")
    k.add_argument(
        "--energy-min-tokens", type=int, default=16384, help="measure energy for rows with M >= this"
    )
    k.add_argument("--no-eager", action="store_true", help="skip the eager (back-to-back) timing")
    k.add_argument("--graphs", action="store_true", help="also time CUDA-graph replays (forward)")
    k.add_argument("--layers", type=int, default=4, help="weight sets called round-robin (default 4)")
    k.add_argument("--reference", default=None, help="module:function for the 'reference' provider")
    k.add_argument("--from-model", default=None, help="local HF model dir: benchmark its real activations")
    k.add_argument("--data", default=None, help="text for --from-model (file or dir of .txt/.jsonl)")
    k.add_argument(
        "--tokenizer", default=None, help="tokenizer dir for --from-model (default: the model dir)"
    )
    m = sub.add_parser("model", help="whole-model prefill and decode, dense HF vs sparsified")
    _common(m, "model-tiny")
    m.add_argument("--batch", type=int, default=None, help="sequences per batch")
    m.add_argument("--seq", type=int, default=None, help="prompt tokens per sequence")
    m.add_argument("--new-tokens", type=int, default=None, help="decode steps timed")
    m.add_argument(
        "--reps", type=int, default=None, help="timed repetitions (default: the model benchmark's)"
    )
    m.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each decode step as a captured CUDA graph (decode without host overhead)",
    )
    t = sub.add_parser("train", help="a training step (forward, backward, AdamW) dense vs sparse")
    _common(t, "train-tiny")
    t.add_argument("--batch", type=int, default=None, help="sequences per batch")
    t.add_argument("--seq", type=int, default=None, help="tokens per sequence")
    t.add_argument(
        "--reps", type=int, default=None, help="timed steps (default: sized from --target-ms, 3-20)"
    )
    r = sub.add_parser("report", help="render BENCHMARKS.md tables and PNG plots from JSON rows")
    r.add_argument("inputs", nargs="*", default=["benchmarks/results"], help="jsonl files or directories")
    r.add_argument("--output", default="BENCHMARKS.md", help="markdown file to write (default BENCHMARKS.md)")
    r.add_argument("--plots", default=None, help="directory for PNGs (default <output dir>/benchmarks/plots)")
    r.add_argument("--title", default="twell benchmarks")
    parser.set_defaults(_bench_parser=parser)


def _cases(args, mode: str):
    from .registry import Case, get_preset

    preset = get_preset(args.preset)
    if preset.mode != mode:
        raise ValueError(
            f"preset: {args.preset!r} is a {preset.mode} preset; `twell bench {mode}` needs a {mode} one"
        )
    cases = list(preset.cases)
    ops = None
    if args.ops:
        bad = [o for o in args.ops if o not in _OP_ALIASES]
        if bad:
            raise ValueError(f"ops: {bad} not in {sorted(_OP_ALIASES)}")
        ops = tuple(_OP_ALIASES[o] for o in args.ops)
    if args.shape:
        cases = [cases[0].with_(shape=s) for s in args.shape]
    kw = {}
    if args.M:
        kw["Ms"] = tuple(args.M)
    if args.active:
        kw["actives"] = tuple(args.active)
    if args.pattern:
        kw["patterns"] = tuple(args.pattern)
    if ops:
        kw["ops"] = ops
    if args.providers:
        kw["providers"] = tuple(args.providers)
    for name in ("batch", "seq", "new_tokens"):
        v = getattr(args, name, None)
        if v is not None:
            kw[name] = v
    out = [c.with_(**kw) for c in cases] if kw else cases
    assert all(isinstance(c, Case) for c in out)
    return out


def _preset_budget(name: str) -> float | None:
    from .registry import get_preset

    return get_preset(name).time_budget_s


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    mode = getattr(args, "bench_mode", None)
    if mode is None:
        args._bench_parser.print_help()
        return 0
    try:
        if mode == "report":
            from .report import render_report

            res = render_report(args.inputs, args.output, args.plots, title=args.title)
            console.print(f"wrote {res['markdown'][0]} and {len(res['plots'])} plots")
            return 0
        cases = _cases(args, mode)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    from .report import print_table

    out_dir = None if args.no_save else args.out
    common = dict(
        device=args.device,
        dtype=args.dtype,
        target_ms=args.target_ms,
        warmup_ms=args.warmup_ms,
        energy=not args.no_energy,
        energy_s=args.energy_s,
        time_budget_s=args.time_budget if args.time_budget is not None else _preset_budget(args.preset),
        seed=args.seed,
    )
    try:
        if mode == "kernels":
            from .runner import BenchOptions, load_callable, run_cases

            opts = BenchOptions(
                **common,
                layers=args.layers,
                eager=not args.no_eager,
                graphs=args.graphs,
                energy_min_tokens=args.energy_min_tokens,
                reference=load_callable(args.reference) if args.reference else None,
            )
            if args.from_model:
                from .real import run_real

                if not args.data:
                    raise ValueError("data: --from-model needs --data PATH (text to run the model on)")
                res = run_real(
                    args.from_model,
                    args.data,
                    opts,
                    cases,
                    out_dir=out_dir,
                    console=console,
                    tokenizer=args.tokenizer,
                )
            else:
                res = run_cases(cases, opts, out_dir=out_dir, console=console)
        else:
            from .model_bench import ModelOptions, run_model_cases

            opts = ModelOptions(**common, reps=args.reps, cuda_graph=getattr(args, "cuda_graph", False))
            res = run_model_cases(cases, opts, bench=mode, out_dir=out_dir, console=console)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    print_table(res.rows, console)
    if res.path is not None:
        console.print(f"rows appended to {res.path}")
    return 0
