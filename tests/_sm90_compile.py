"""Compile recorded Triton kernel launches for sm_90 without a GPU (helper of test_compile_sm90.py).

Run as a script with the interpreter off: reads a JSON list of launch specs on stdin (module and
name of the kernel, each parameter's type or constexpr value, warps and stages), compiles each with
Triton's own compiler for the CUDA target (compute capability 9.0: TTIR, TTGIR, LLVM IR, PTX and a
cubin from the bundled ptxas) and prints a JSON list of [kernel, error or null] on stdout.
"""

from __future__ import annotations

import importlib
import json
import sys

__all__ = ["compile_specs"]


def _value(v):
    # constexprs: JSON values as they are, {"dtype": name} as a Triton dtype
    import triton.language as tl

    if isinstance(v, dict) and "dtype" in v:
        return tl.dtype(v["dtype"])
    return v


def compile_specs(specs: list[dict]) -> list[list]:
    """[kernel, None or the error's text] for each spec, compiled for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    out = []
    for spec in specs:
        name = f"{spec['module']}.{spec['name']}"
        try:
            fn = getattr(importlib.import_module(spec["module"]), spec["name"])
            sig, consts = {}, {}
            for i, arg in enumerate(fn.arg_names):
                kind, v = spec["args"][arg]
                if kind == "c":
                    sig[arg] = "constexpr"
                    consts[(i,)] = _value(v)
                else:
                    sig[arg] = v
            src = ASTSource(fn=fn, signature=sig, constexprs=consts)
            triton.compile(src, target=target, options=spec["options"])
            out.append([name, None])
        except Exception as e:  # every failure is reported, the others still compile
            out.append([name, f"{type(e).__name__}: {e}"[:2000]])
    return out


if __name__ == "__main__":
    json.dump(compile_specs(json.load(sys.stdin)), sys.stdout)
