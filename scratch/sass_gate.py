"""Compile _gate_pack_tma_kernel for sm_90 offline; print SASS instruction counts."""
import os, re, subprocess, sys, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, "src")
from twell.ops import gate_pack as gp

def build(fn=gp._gate_pack_tma_kernel, extra=None):
    sig = {"x_desc": "tensordesc<bf16[128, 64]>", "w_desc": "tensordesc<bf16[256, 64]>",
           "counts_ptr": "*i32", "values_ptr": "*i16", "columns_ptr": "*i16", "ucounts_ptr": "*i32",
           "M": "i32", "N": "i32", "K": "i32", "NT": "i32"}
    cons = dict(OUT_DTYPE=tl.bfloat16, BITS_DTYPE=tl.int16, INF_BITS=0x7F80, MAG_MASK=0x7FFF, S=32, BM=128, BN=256,
                BK=64, CH=32, GROUP_M=8, NUM_SMS=132, DOT_PREC="tf32", HW_POPC=True, ASM_STORE=True,
                UNIT_COUNTS=False, FLATTEN=True)
    cons.update(extra or {})
    for k in list(cons):
        sig[k] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs={(list(sig).index(k),): v for k, v in cons.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": 8, "num_stages": 3})
    return k

k = build(extra=dict(eval(sys.argv[1])) if len(sys.argv) > 1 else None)
d = tempfile.mkdtemp()
open(f"{d}/k.cubin", "wb").write(k.asm["cubin"])
ptxas_dir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
sass = subprocess.run([f"{ptxas_dir}/nvdisasm", "-c", f"{d}/k.cubin"], capture_output=True, text=True).stdout
ins = [l for l in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", l)]
print("smem", k.metadata.shared, "instructions", len(ins)); print([l for l in k.asm["ptx"].splitlines() if "maxnreg" in l or ".reg .b32" in l][:3])
ops = {}
for l in ins:
    m = re.search(r"\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", l)
    if m:
        op = m.group(2).split(".")[0]
        ops[op] = ops.get(op, 0) + 1
print(sorted(ops.items(), key=lambda t: -t[1])[:40])
open("scratch/gate.sass", "w").write(sass)
open("scratch/gate.ptx", "w").write(k.asm["ptx"])
