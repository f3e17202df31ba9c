"""The benchmark runner: kernel-level FFN rows (``ffn_fwd``, ``ffn_fwdbwd``) against dense.

Legend: M = tokens of one call, K = model dim, N = FFN units, a = active units per token,
L = weight sets ("layers") called round-robin.

For each case of a preset: L = 4 weight sets with a controlled number of active units per
token (:func:`twell.testing.make_sparse_ffn`, one seed per set; together they hold more than
the H100's 50 MB L2 at the paper shape, so no call finds its weights there), one shared input
``x``, then per M: the measured activity (active units per token, the union density u(M) of the
call, the largest (token, tile) count), the roofline bound, and per provider: device time
(queued behind a GPU sleep), eager time, optionally CUDA-graph time, peak memory and energy.
Every row follows DESIGN section 7; see :data:`REQUIRED_FIELDS`.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .energy import measure_energy, open_meter
from .env import env_info, resolve_device, resolve_dtype, slug
from .registry import KERNEL_OPS, Case, get_preset, get_shape
from .roofline import Roofs, measure_roofs, sparse_floor_ms, speedup_bound
from .timing import peak_memory_mib, time_calls, time_graphs

__all__ = [
    "REQUIRED_FIELDS",
    "BenchOptions",
    "BenchResult",
    "default_out_path",
    "dense_ffn",
    "l1_of",
    "run_kernels",
    "run_cases",
    "check_row",
    "write_rows",
    "load_callable",
]

#: DESIGN section 7: every row carries these fields with these types
REQUIRED_FIELDS: dict[str, tuple[type, ...]] = {
    "bench": (str,),
    "op": (str,),
    "shape": (str,),
    "K": (int,),
    "N": (int,),
    "M": (int,),
    "active_per_token": (float,),
    "pattern": (str,),
    "provider": (str,),
    "dtype": (str,),
    "ms": (float,),
    "ms_p20": (float,),
    "ms_p80": (float,),
    "tokens_per_ms": (float,),
    "speedup_vs_dense": (float,),
    "bound": (float,),
    "achieved_over_bound": (float,),
    "peak_mem_mib": (float, type(None)),
    "energy_mj_per_token": (float, type(None)),
    "gpu": (str,),
    "torch": (str,),
    "triton": (str,),
    "commit": (str,),
    "timestamp": (str,),
}

_TOKEN_CHUNK = 16384  # rows per gate matmul when measuring activity (bounds the [chunk, N] temporary)


def check_row(row: dict) -> None:
    """Raises ``ValueError`` naming the field when ``row`` misses a DESIGN 7 field or has the wrong type."""
    for k, types in REQUIRED_FIELDS.items():
        if k not in row:
            raise ValueError(f"row: missing required field {k!r}")
        v = row[k]
        if isinstance(v, bool) or not isinstance(v, types):
            raise ValueError(f"row: field {k!r} = {v!r} is {type(v).__name__}, expected {types}")


def dense_ffn(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """The dense gated-ReLU FFN ``[M, K] -> [M, K]``: three ``F.linear`` (cuBLAS on CUDA) and
    relu * mul, the same math as :func:`twell.ops.ffn_ref.sparse_ffn_ref` without its statistics
    pass (counting active units and tile overflow reads g once more, which would slow the
    baseline)."""
    return F.linear(torch.relu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def _dense_with_l1(x, w_gate, w_up, w_down):
    """Dense FFN and its L1 term (mean over tokens of sum |h|, fp32), the L1 as one reduction
    that casts on the fly: ``h.float().abs().sum()`` writes two fp32 [M, N] copies of h and cost
    about 0.5 ms more per forward + backward at M = 16384, N = 5632 on the H100."""
    h = torch.relu(F.linear(x, w_gate)) * F.linear(x, w_up)
    return F.linear(h, w_down), l1_of(h)


def l1_of(h: torch.Tensor) -> torch.Tensor:
    """``sum |h| / tokens`` in fp32 for ``h [..., N]``: the dense baselines' L1 term."""
    return torch.linalg.vector_norm(h, 1, dtype=torch.float32) / max(h.numel() // max(h.shape[-1], 1), 1)


def load_callable(spec: str) -> Callable:
    """``"package.module:function"`` -> the function (the ``reference`` provider)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"reference: expected 'module:function', got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    mod = importlib.import_module(mod_name)
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reference: {fn_name!r} in {mod_name!r} is not a callable")
    return fn


@dataclass
class BenchOptions:
    """Knobs of a run (the CLI maps its flags onto these).

    Attributes:
        device, dtype: None picks cuda/bfloat16 when available, else cpu/float32.
        layers: weight sets called round-robin (4: no call finds its weights in L2).
        target_ms, warmup_ms: time per timed method per row, and warm-up per row.
        eager: also time back-to-back eager calls (CUDA). graphs: also time CUDA-graph replays
            (forward ops only).
        energy: measure energy per token (NVML) for rows with M >= energy_min_tokens, over
            about energy_s seconds per provider.
        time_budget_s: stop starting new rows after this many seconds (None: no limit).
        reference: the ``reference`` provider, ``fn(x, w_gate, w_up, w_down) -> y``.
        l1_coeff: weight of the L1 term in ``ffn_fwdbwd`` (both providers pay it).
        tile, slots: TwELL geometry for the overflow statistic of the rows.
        quick_roofs: smaller roof measurements (tests).
    """

    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    layers: int = 4
    target_ms: float = 300.0
    warmup_ms: float = 100.0
    eager: bool = True
    graphs: bool = False
    energy: bool = True
    energy_s: float = 1.0
    energy_min_tokens: int = 16384
    time_budget_s: float | None = None
    reference: Callable | None = None
    l1_coeff: float = 1e-4
    tile: int = 256
    slots: int = 32
    seed: int = 0
    quick_roofs: bool = False

    def __post_init__(self):
        if not isinstance(self.layers, int) or self.layers < 1:
            raise ValueError(f"layers: expected a positive int, got {self.layers!r}")
        if self.target_ms <= 0 or self.warmup_ms < 0:
            raise ValueError(
                f"target_ms/warmup_ms: expected > 0 / >= 0, got {self.target_ms}/{self.warmup_ms}"
            )
        if self.energy_s <= 0:
            raise ValueError(f"energy_s: expected > 0, got {self.energy_s}")


# ---------------------------------------------------------------------------------------------
# inputs and measured activity


def _make_inputs(shape, a: float, pattern: str, M_max: int, opts: BenchOptions, device, dtype):
    """L weight sets and one shared ``x [M_max, K]`` for (shape, a, pattern)."""
    from ..testing import make_sparse_ffn

    weights = []
    for s in range(opts.layers):
        _, wg, wu, wd = make_sparse_ffn(1, shape.K, shape.N, a, pattern=pattern, seed=opts.seed + s)
        weights.append(tuple(w.to(device=device, dtype=dtype) for w in (wg, wu, wd)))
    g = torch.Generator(device=device)
    g.manual_seed(opts.seed + 1000)
    x = torch.randn(M_max, shape.K, generator=g, device=device, dtype=torch.float32)
    x[:, 0] = 1.0  # make_sparse_ffn's threshold input column (x_const = 1)
    if pattern == "heavy":
        # make_sparse_ffn's heavy tokens carry a larger column-0 value; read it from a small draw
        # and give it to rows 0, 100, 200, ... (1% of tokens, at least one, in every prefix)
        xs, *_ = make_sparse_ffn(200, shape.K, shape.N, a, pattern="heavy", seed=opts.seed)
        col = xs[:, 0]
        scale = float(col[col != 1.0][0]) if bool((col != 1.0).any()) else 1.0
        x[::100, 0] = scale
    return weights, x.to(dtype)


@torch.no_grad()
def _activity(
    x: torch.Tensor, weights, Ms: Sequence[int], tile: int, slots: int
) -> dict[int, dict[str, float]]:
    """Per M (prefix x[:M]): measured active units per token, union density u(M), the largest
    (token, tile) count and the number of overflowing tokens, averaged over the weight sets."""
    Ms = sorted(set(Ms))
    N = weights[0][0].shape[0]
    NT = -(-N // tile)
    acc = {M: {"active": 0.0, "union": 0.0, "tile_max": 0.0, "overflow_rows": 0.0} for M in Ms}
    for wg, _, _ in weights:
        union = torch.zeros(N, dtype=torch.bool, device=x.device)
        total = 0.0
        tmax = 0
        over = 0
        start = 0
        for M in Ms:
            while start < M:
                stop = min(M, start + _TOKEN_CHUNK)
                act = F.linear(x[start:stop], wg) > 0
                total += float(act.sum())
                union |= act.any(dim=0)
                pad = torch.zeros(stop - start, NT * tile, dtype=torch.int32, device=x.device)
                pad[:, :N] = act
                per_tile = pad.view(stop - start, NT, tile).sum(-1)
                tmax = max(tmax, int(per_tile.max()))
                over += int((per_tile > slots).any(dim=1).sum())
                start = stop
            acc[M]["active"] += total / M
            acc[M]["union"] += float(union.float().mean())
            acc[M]["tile_max"] = max(acc[M]["tile_max"], float(tmax))
            acc[M]["overflow_rows"] += over
    L = len(weights)
    for v in acc.values():
        v["active"] /= L
        v["union"] /= L
        v["overflow_rows"] /= L
    return acc


# ---------------------------------------------------------------------------------------------
# the callables timed per provider


def _twell_path(op: str, device: torch.device, N: int) -> str:
    """Which implementation ``twell.sparse_ffn`` runs for this op on this device."""
    from .._checks import MAX_COLUMNS

    mod = "twell.ops.ffn_infer" if op == "ffn_fwd" else "twell.ops.ffn_train"
    if device.type == "cuda" and N <= MAX_COLUMNS and importlib.util.find_spec(mod) is not None:
        return "triton"
    return "reference"


def _dispatch(op: str, device: torch.device, M: int, N: int, w_gate: torch.Tensor) -> str | None:
    """The path ``twell.ops.ffn_infer`` picks for this call after warm-up (``prefill``, ``decode``
    or ``dense``), from its density estimate for ``w_gate``; None where that cannot be read (CPU,
    training op, or an install whose dispatcher differs)."""
    if op != "ffn_fwd" or device.type != "cuda":
        return None
    try:
        from twell.ops import ffn_infer as fi

        d = fi._DENSITY.get(id(w_gate))
        return fi.choose_path(M, N, None if d is None else d.est, w_gate.shape[1], fi.atomics_allowed(False))
    except (ImportError, AttributeError, TypeError):
        return None


def _fns(op: str, provider: str, xs, weights, opts: BenchOptions, dy=None) -> list[Callable]:
    """One zero-argument callable per weight set. ``xs`` is one x per set (shared or per layer)."""
    import twell

    out = []
    for x, (wg, wu, wd) in zip(xs, weights):
        if op == "ffn_fwd":
            if provider == "dense":
                f = lambda x=x, wg=wg, wu=wu, wd=wd: dense_ffn(x, wg, wu, wd)
            elif provider == "twell":
                f = lambda x=x, wg=wg, wu=wu, wd=wd: twell.sparse_ffn(x, wg, wu, wd)
            else:
                f = lambda x=x, wg=wg, wu=wu, wd=wd: opts.reference(x, wg, wu, wd)
            out.append(_no_grad(f))
            continue
        # ffn_fwdbwd: leaf copies that require grad; the L1 term is part of both losses
        x_, wg_, wu_, wd_ = (t.detach().requires_grad_(True) for t in (x, wg, wu, wd))
        coeff = torch.tensor(opts.l1_coeff, device=x.device)
        if provider == "dense":
            fwd = lambda x_=x_, wg_=wg_, wu_=wu_, wd_=wd_: _dense_with_l1(x_, wg_, wu_, wd_)
        elif provider == "twell":

            def fwd(x_=x_, wg_=wg_, wu_=wu_, wd_=wd_):
                y, st = twell.sparse_ffn(x_, wg_, wu_, wd_, return_stats=True)
                return y, st.l1

        else:
            raise ValueError("provider: 'reference' is timed for ffn_fwd only")

        def f(fwd=fwd, ins=(x_, wg_, wu_, wd_), dy=dy, coeff=coeff):
            y, l1 = fwd()
            return torch.autograd.grad((y, l1), ins, (dy[: y.shape[0]], coeff))

        out.append(fwd if op == "train_fwd" else f)
    return out


def _train_fwd_ms(provider: str, xs, weights, opts: BenchOptions, device) -> float:
    """Device time of the training forward alone (leaves that require grad, the graph built for
    the backward and dropped), the first half of an ``ffn_fwdbwd`` row."""
    fns = _fns("train_fwd", provider, xs, weights, opts)
    t = time_calls(fns, device, methods=("queued",), warmup_ms=opts.warmup_ms, target_ms=opts.target_ms)
    return (t.get("queued") or t["wall"]).ms


def _no_grad(f: Callable) -> Callable:
    def g():
        with torch.no_grad():
            return f()

    return g


# ---------------------------------------------------------------------------------------------
# rows


def _measure_provider(fns, device, opts: BenchOptions, op: str, M: int, meter) -> dict:
    timings = time_calls(
        fns,
        device,
        methods=("queued", "eager") if opts.eager else ("queued",),
        warmup_ms=opts.warmup_ms,
        target_ms=opts.target_ms,
    )
    main = timings.get("queued") or timings["wall"]
    res = {
        "ms": main.ms,
        "ms_p20": main.p20,
        "ms_p80": main.p80,
        "reps": main.reps,
        "timing": main.method,
        "host_us_per_call": None if main.host_ms is None else 1e3 * main.host_ms,
        "queued_ok": main.queued_ok,
    }
    if "eager" in timings:
        e = timings["eager"]
        res.update(eager_ms=e.ms, eager_ms_p20=e.p20, eager_ms_p80=e.p80)
    if opts.graphs and op == "ffn_fwd" and device.type == "cuda":
        t, why = time_graphs(fns, device, target_ms=opts.target_ms)
        res["graph_ms"] = None if t is None else t.ms
        if why:
            res["graph_note"] = why
    res["peak_mem_mib"] = peak_memory_mib(fns[0], device)
    res["energy_mj_per_token"] = None
    if meter is not None and M >= opts.energy_min_tokens:
        e = measure_energy(meter, fns, device, call_ms=main.ms, seconds=opts.energy_s)
        res["energy_mj_per_token"] = e["mj_per_call"] / M
        res["avg_power_w"] = e["avg_power_w"]
    return res


def _row(
    env, base: dict, res: dict, provider: str, dense_ms: float | None, bound: float, floor_ms: float
) -> dict:
    speedup = dense_ms / res["ms"] if dense_ms else float("nan")
    row = {
        **base,
        "provider": provider,
        "ms": float(res["ms"]),
        "ms_p20": float(res["ms_p20"]),
        "ms_p80": float(res["ms_p80"]),
        "tokens_per_ms": float(base["M"] / res["ms"]),
        "speedup_vs_dense": float(speedup),
        "bound": float(bound),
        "achieved_over_bound": float(speedup / bound),
        "peak_mem_mib": res.get("peak_mem_mib"),
        "energy_mj_per_token": res.get("energy_mj_per_token"),
        "gpu": env["gpu"],
        "torch": env["torch"],
        "triton": env["triton"],
        "commit": env["commit"],
        "timestamp": env["timestamp"],
        "cuda": env["cuda"],
        "device": env["device"],
        "bound_ms": float(floor_ms),
        "roof_fraction": float(floor_ms / res["ms"]),
    }
    for k, v in res.items():
        row.setdefault(k, v)
    return row


@dataclass
class BenchResult:
    """What a run produced: its rows, environment, measured roofs and the JSON-lines file."""

    rows: list[dict]
    env: dict
    roofs: Roofs
    path: Path | None = None


class _Session:
    """What every row of one run shares: environment, roofs, energy meter, output file, clock."""

    def __init__(self, opts: BenchOptions, bench: str, out_dir, console):
        self.opts = opts
        self.bench = bench
        self.device = resolve_device(opts.device)
        self.dtype = resolve_dtype(opts.dtype, self.device)
        self.elem = torch.empty((), dtype=self.dtype).element_size()
        self.t_start = time.perf_counter()
        self.env = env_info(self.device)
        self.say = console.print if console is not None else (lambda *a, **k: None)
        env = self.env
        self.say(
            f"[bold]twell bench {bench}[/bold]: {env['gpu']} | CUDA {env['cuda']} | torch {env['torch']} | "
            f"triton {env['triton']} | commit {env['commit']}"
        )
        self.roofs = measure_roofs(self.device, self.dtype, quick=opts.quick_roofs)
        r = self.roofs
        self.say(
            f"roofs ({r.dtype}): matmul {r.matmul_tflops:.1f} TFLOP/s (n={r.matmul_n}), "
            f"copy {r.copy_gbps:.1f} GB/s ({r.copy_mib:.0f} MiB, read+write)"
        )
        self.meter, why = open_meter(self.device) if opts.energy else (None, "disabled")
        if opts.energy and self.meter is None and self.device.type == "cuda":
            self.say(f"[yellow]energy not measured: {why}[/yellow]")
        self.rows: list[dict] = []
        self.skipped = 0
        self.path = None
        self._fh = None
        if out_dir is not None:
            self.path = default_out_path(out_dir, bench, env)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a")

    def over_budget(self) -> bool:
        b = self.opts.time_budget_s
        return b is not None and time.perf_counter() - self.t_start > b

    def points(self, ops, **kw) -> None:
        """Times every op of ``ops`` at one point; once the time budget is spent, counts them as skipped."""
        for op in ops:
            if self.over_budget():
                self.skipped += 1
                continue
            self.point(op=op, **kw)

    def point(self, *, op, M, shape_name, K, N, pattern, target, act, xs, weights, dy, providers) -> None:
        """Measures every provider at one (op, M, inputs) and records the rows."""
        opts, roofs = self.opts, self.roofs
        base = {
            "bench": self.bench,
            "op": op,
            "shape": shape_name,
            "K": int(K),
            "N": int(N),
            "M": int(M),
            "active_per_token": float(act["active"]),
            "target_active": float(target),
            "pattern": pattern,
            "dtype": str(self.dtype).replace("torch.", ""),
            "union_density": float(act["union"]),
            "tile_max": float(act["tile_max"]),
            "overflow_rows": float(act["overflow_rows"]),
            "layers": len(weights),
            "roof_matmul_tflops": roofs.matmul_tflops,
            "roof_copy_gbps": roofs.copy_gbps,
        }
        args = (op, M, K, N, act["active"], act["union"], roofs, self.elem)
        bound = speedup_bound(*args)
        floor_ms = sparse_floor_ms(*args)
        provs = ["dense"] + [p for p in providers if p != "dense"]
        if op == "ffn_fwdbwd":
            provs = [p for p in provs if p != "reference"]
        dense_ms = dense_fwd_ms = None
        for prov in provs:
            fns = _fns(op, prov, xs, weights, opts, dy)
            res = _measure_provider(fns, self.device, opts, op, M, self.meter)
            if prov == "dense":
                dense_ms = res["ms"]
            if op == "ffn_fwdbwd":
                res["fwd_ms"] = _train_fwd_ms(prov, xs, weights, opts, self.device)
                dense_fwd_ms = dense_fwd_ms or res["fwd_ms"]
                res["fwd_speedup_vs_dense"] = dense_fwd_ms / res["fwd_ms"]
            if prov == "twell":
                res["twell_path"] = _twell_path(op, self.device, N)
                res["twell_dispatch"] = _dispatch(op, self.device, M, N, weights[0][0])
            row = _row(self.env, base, res, prov, dense_ms, bound, floor_ms)
            check_row(row)
            self.rows.append(row)
            if self._fh is not None:
                self._fh.write(json.dumps(row) + "\n")
                self._fh.flush()
            self.say(_progress_line(row))
            del fns

    def close(self) -> BenchResult:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.skipped:
            self.say(
                f"[yellow]time budget of {self.opts.time_budget_s:.0f} s reached: "
                f"{self.skipped} (M, op) points skipped[/yellow]"
            )
        return BenchResult(self.rows, self.env, self.roofs, self.path)


def _check_cases(cases: list[Case], opts: BenchOptions) -> None:
    for c in cases:
        bad = [o for o in c.ops if o not in KERNEL_OPS]
        if bad:
            raise ValueError(f"ops: {bad} are not kernel ops {KERNEL_OPS} (use the model or train modes)")
        if "reference" in c.providers and opts.reference is None:
            raise ValueError(
                "reference: the 'reference' provider needs a callable (--reference module:function)"
            )
        shape = get_shape(c.shape)
        big = [a for a in c.actives if a > shape.N]
        if big:
            raise ValueError(f"actives: {big} exceed N={shape.N} of shape {shape.name}")


def run_cases(
    cases: Iterable[Case],
    opts: BenchOptions | None = None,
    *,
    out_dir: str | Path | None = None,
    console=None,
    bench: str = "kernels",
) -> BenchResult:
    """Runs kernel-level cases. With ``out_dir``, rows are appended to
    ``<out_dir>/kernels-<device>-<time>.jsonl`` as they are measured, so an interrupted run keeps
    what it measured."""
    opts = opts or BenchOptions()
    cases = list(cases)
    _check_cases(cases, opts)
    ses = _Session(opts, bench, out_dir, console)
    device, dtype = ses.device, ses.dtype
    try:
        for case in cases:
            shape = get_shape(case.shape)
            for pattern in case.patterns:
                for a in case.actives:
                    if ses.over_budget():
                        ses.skipped += len(case.Ms) * len(case.ops)
                        continue
                    weights, x = _make_inputs(shape, a, pattern, max(case.Ms), opts, device, dtype)
                    activity = _activity(x, weights, case.Ms, opts.tile, opts.slots)
                    dy = None
                    if "ffn_fwdbwd" in case.ops:
                        g = torch.Generator(device=device)
                        g.manual_seed(opts.seed + 2000)
                        dy = torch.randn(max(case.Ms), shape.K, generator=g, device=device).to(dtype)
                    for M in case.Ms:
                        ses.points(
                            case.ops,
                            M=M,
                            shape_name=shape.name,
                            K=shape.K,
                            N=shape.N,
                            pattern=pattern,
                            target=a,
                            act=activity[M],
                            xs=[x[:M]] * len(weights),
                            weights=weights,
                            dy=dy,
                            providers=case.providers,
                        )
                    del weights, x, dy
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    finally:
        res = ses.close()
    return res


def _progress_line(row: dict) -> str:
    return (
        f"  {row['op']:<10} {row['shape']:<16} M={row['M']:<7} a={row['active_per_token']:<7.1f} "
        f"{row['pattern']:<7} {row['provider']:<9} {row['ms']:.4f} ms  x{row['speedup_vs_dense']:.2f} "
        f"(bound {row['bound']:.2f})"
    )


def write_rows(rows: Iterable[dict], path: str | Path) -> Path:
    """Appends ``rows`` to the JSON-lines file ``path`` (one object per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        for r in rows:
            check_row(r)
            fh.write(json.dumps(r) + "\n")
    return path


def default_out_path(out_dir: str | Path, bench: str, env: dict) -> Path:
    """``<out_dir>/<bench>-<device slug>-<UTC time>.jsonl``."""
    stamp = env["timestamp"].replace(":", "").replace("-", "").replace("+0000", "Z")
    return Path(out_dir) / f"{bench}-{slug(env['gpu'])}-{stamp}.jsonl"


def run_kernels(
    preset: str | None = "tiny",
    *,
    cases: Sequence[Case] | None = None,
    out_dir: str | Path | None = None,
    console=None,
    **options,
) -> list[dict]:
    """Runs the kernel benchmark and returns its rows (DESIGN 7 dicts).

    Args:
        preset: a registered preset of mode ``kernels`` (``tiny``, ``h100``, ``paper``, ``shapes``);
            ignored when ``cases`` is given.
        cases: explicit :class:`twell.bench.registry.Case` list.
        out_dir: when given, rows are appended to ``<out_dir>/kernels-<device>-<time>.jsonl``.
        console: a ``rich.console.Console`` for progress lines (None: silent).
        **options: fields of :class:`BenchOptions` (device, dtype, target_ms, energy, ...).

    Example::

        >>> rows = twell.bench.run_kernels("tiny", target_ms=20)   # doctest: +SKIP
        >>> twell.bench.print_table(rows)                           # doctest: +SKIP
    """
    if cases is None:
        p = get_preset(preset)
        if p.mode != "kernels":
            raise ValueError(f"preset: {preset!r} is a {p.mode} preset, not a kernels preset")
        cases = p.cases
    opts = BenchOptions(**options)
    return run_cases(cases, opts, out_dir=out_dir, console=console).rows
