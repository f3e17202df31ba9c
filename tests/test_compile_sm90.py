"""The kernels the CPU suite runs under Triton's interpreter also compile for sm_90 (the H100).

The interpreter executes a kernel's Python body, so it does not check what only the compiler does:
a loop-carried variable re-assigned with another shape, branches whose types do not unify, a
construct the code generator rejects. Such a kernel passes every CPU test and then fails to build
on the GPU (where the dispatcher falls back to dense, so only the speed would show it). This test
records the launches of one call per decode form, the prefill and a training step under the
interpreter (each parameter's type or constexpr value, warps, stages) and compiles every distinct
launch for compute capability 9.0 in a subprocess with the interpreter off
(``tests/_sm90_compile.py``), as the GPU would, down to the cubin.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from twell.ops.configs import override
from twell.ops.ffn_infer import ffn_infer
from twell.testing import make_sparse_ffn

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU only (under the interpreter; on a GPU every kernel is compiled by its own tests)",
)

_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}
#: launch keywords that are compile options; the other launch keywords (e.g. launch_pdl) are not
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _constexpr(v):
    import triton.language as tl

    if isinstance(v, tl.constexpr):
        v = v.value
    if isinstance(v, tl.dtype):
        return {"dtype": v.name}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"constexpr value {v!r} has no JSON form")


def _spec(kernel, args, kwargs) -> dict:
    # the launch of `kernel` (an InterpretedFunction) as JSON: each parameter's type or constexpr
    fn = kernel.fn
    params = inspect.signature(fn).parameters
    given = dict(zip(kernel.arg_names, args))
    given.update((k, v) for k, v in kwargs.items() if k in params)
    out = {}
    for name, p in params.items():
        v = given.get(name, p.default)
        assert v is not inspect.Parameter.empty, f"{fn.__name__}: no value for {name}"
        if "constexpr" in str(p.annotation) or v is None:
            out[name] = ["c", _constexpr(v)]
        elif isinstance(v, torch.Tensor):
            out[name] = ["t", "*" + _DTYPES[v.dtype]]
        elif type(v).__name__ == "TensorDescriptor":  # (a TMA descriptor: dtype and block shape)
            out[name] = ["t", f"tensordesc<{_DTYPES[v.base.dtype]}[{', '.join(map(str, v.block_shape))}]>"]
        elif isinstance(v, bool):
            out[name] = ["t", "i1"]
        elif isinstance(v, int):
            out[name] = ["t", "i32" if -(2**31) <= v < 2**31 else "i64"]
        elif isinstance(v, float):
            out[name] = ["t", "fp32"]
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(v).__name__}")
    options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
    return {"module": fn.__module__, "name": fn.__name__, "args": out, "options": options}


def _decode(M, K, **cfg):
    def run():
        x, wg, wu, wd = make_sparse_ffn(M, K, 300, 12, device="cpu", seed=M + K)
        with override("infer", **cfg):
            ffn_infer(x, wg, wu, wd, tile=64, slots=8, path="decode")

    return run


def _deterministic_decode():
    torch.use_deterministic_algorithms(True)
    try:
        _decode(5, 48)()
    finally:
        torch.use_deterministic_algorithms(False)


def _prefill(**cfg):
    def run():
        x, wg, wu, wd = make_sparse_ffn(130, 96, 300, 12, device="cpu", seed=3)
        with override("infer", **cfg):
            ffn_infer(x, wg, wu, wd, tile=64, slots=8, path="prefill")

    return run


def _dense():
    x, wg, wu, wd = make_sparse_ffn(9, 48, 300, 12, device="cpu", seed=4)
    ffn_infer(x, wg, wu, wd, tile=64, slots=8, path="dense")


def _train_step(deterministic=False, **cfg):
    def run():
        from twell.ops import ffn_train as ft

        old = ft.CONFIG
        ft.CONFIG = ft.TrainConfig(**cfg)
        try:
            x, wg, wu, wd = make_sparse_ffn(13, 40, 100, 2, device="cpu", seed=5)
            x[6, 0] = -50.0  # column 0 carries the threshold: every unit of this token active
            x, wg, wu, wd = (t.requires_grad_() for t in (x, wg, wu, wd))
            y, st = ft.ffn_train(x, wg, wu, wd, tile=64, slots=8, deterministic=deterministic, dispatch=False)
            torch.autograd.backward([y, st.l1], [torch.randn_like(y), torch.ones_like(st.l1)])
        finally:
            ft.CONFIG = old

    return run


_PAIRS = dict(decode_pairs_min_m=1, decode_pairs_max_m=64, decode_pairs_min_k=0, decode_pairs_short_min_m=0)
_UNITS = dict(decode_pairs_min_k=0, decode_pairs_units_min_m=1, decode_pairs_units_max_m=64)
_UNION = dict(
    decode_union_min_m=3, decode_union_max_m=128, decode_union_min_k=0, decode_chunk_max_m=0,
    decode_chunk_long_max_m=0, decode_barrier_max_m=0,
)  # fmt: skip
_NO_ATOMIC = dict(
    decode_atomic_max_m=0, decode_atomic_dot_min_m=0, decode_units_max_m=0, decode_chunk_max_m=0,
    decode_chunk_long_max_m=0, decode_union_max_m=0,
)  # fmt: skip

#: constexpr values that only a GPU launch takes (the interpreter runs another branch): each
#: recorded launch of these kernels is also compiled with them (the L2 prefetch of the units
#: variant's gate; the barrier form in one launch, its grid-wide barrier included)
GPU_VARIANTS = {
    "_pairs_gate_kernel": {"PF_LINE": 32, "PF_DOWN": 4},
    "_decode_barrier_kernel": {"PHASE": 0},
}

#: one call per form: (name, callable)
CALLS = [
    ("decode-default-1", _decode(1, 96)),
    ("decode-gemv-atomic-2", _decode(2, 40, decode_atomic_max_m=2, decode_gemv_max_m=2, decode_bk_up=16)),
    ("decode-dot-compact-7", _decode(7, 48, decode_atomic_dot_min_m=3, decode_units_max_m=0, decode_chunk_max_m=0)),
    ("decode-units-form-3", _decode(3, 96, decode_units_max_m=8, decode_chunk_min_m=9)),
    ("decode-chunk-5", _decode(5, 48, decode_chunk_min_m=1, decode_chunk_max_m=64, decode_chunk_bk=16)),
    ("decode-union-33", _decode(33, 40, **_UNION)),
    ("decode-union-33-finish-kernel", _decode(33, 40, decode_union_finish=False, **_UNION)),
    ("decode-barrier-8", _decode(8, 200, decode_barrier_min_m=1, decode_barrier_max_m=64, decode_units_max_m=0,
                                 decode_chunk_max_m=0, decode_chunk_long_max_m=0, decode_chunk_programs=16)),
    ("decode-pairs-17", _decode(17, 48, decode_pairs_split=4, **_PAIRS)),
    ("decode-pairs-units-33", _decode(33, 72, decode_pairs_units_pair_down_max_m=0, **_UNITS)),
    ("decode-pairs-units-pair-down-33", _decode(33, 72, decode_pairs_units_pair_down_max_m=64, **_UNITS)),
    ("decode-split-5", _decode(5, 32, decode_down_chunk=16, **_NO_ATOMIC)),
    ("decode-deterministic-5", _deterministic_decode),
    ("prefill-rows", _prefill()),
    ("prefill-two-passes", _prefill(prefill_two_passes=True, prefill_rows=False)),
    ("dense", _dense),
    ("train-step", _train_step(row_capacity=8)),
    ("train-step-deterministic", _train_step(deterministic=True)),
    ("train-step-gate-bits", _train_step(gate_bits="always", gate_bits_min_m=0, row_capacity=8)),
]  # fmt: skip


def test_kernels_compile_for_sm90(monkeypatch):
    pytest.importorskip("triton.backends.nvidia")
    from triton.runtime.interpreter import InterpretedFunction

    specs: dict[str, dict] = {}
    run = InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        s = _spec(self, args, kwargs)
        specs.setdefault(json.dumps(s, sort_keys=True), s)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", record)
    for _, call in CALLS:
        call()
    monkeypatch.undo()
    for s in list(specs.values()):
        if s["name"] in GPU_VARIANTS:
            v = json.loads(json.dumps(s))
            v["args"].update((k, ["c", c]) for k, c in GPU_VARIANTS[s["name"]].items())
            specs.setdefault(json.dumps(v, sort_keys=True), v)
    names = {s["name"] for s in specs.values()}
    # the forms above reach these kernels (a rename or a form that stopped launching shows here)
    for kernel in (
        "_decode_barrier_kernel",
        "_pairs_gate_kernel",
        "_pairs_up_kernel",
        "_pairs_down_kernel",
        "_decode_union_down_kernel",
        "_decode_gate_up_kernel",
        "_gate_pack_kernel",
        "_gate_bits_kernel",
        "_fwd_rows_kernel",
        "_bwd_rows_kernel",
        "_wgrad_kernel",
    ):
        assert kernel in names, sorted(names)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_sm90_compile.py"))],
        input=json.dumps(list(specs.values())),
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout)
    assert len(results) == len(specs)
    failed = [f"{name}: {err}" for name, err in results if err is not None]
    assert not failed, "\n\n".join(failed)
