"""GPU check + timing of gate_pack_ws against the Triton TMA kernel and cuBLAS (scratch)."""
import json, os, sys, time
sys.path.insert(0, "benchmarks")
import torch
import torch.nn.functional as F
from dev_infer import _time, _weights, _x
from twell.ops import gate_pack as gp
from twell.ops.configs import override
from twell.testing import make_sparse_ffn

out = os.environ.get("OUT", "/tmp")
rows = []
torch.manual_seed(0)

def run(x, wg, ws, uc=False):
    M, K = x.shape; N = wg.shape[0]; NT = (N + 255) // 256
    counts = torch.full((M, NT), -7, dtype=torch.int32, device="cuda")
    values = torch.zeros((M, NT, 32), dtype=x.dtype, device="cuda")
    columns = torch.full((M, NT, 32), -1, dtype=torch.int16, device="cuda")
    ucounts = torch.zeros(N, dtype=torch.int32, device="cuda") if uc else None
    with override("gate", use_ws="auto" if ws else "never"):
        gp.launch_gate_pack(x, wg, 256, 32, counts, values, columns, ucounts)
    torch.cuda.synchronize()
    return counts, values, columns, ucounts

def compare(tag, x, wg, uc=False):
    a = run(x, wg, True, uc); b = run(x, wg, False, uc)
    used = torch.arange(32, device="cuda").view(1, 1, 32) < b[0].clamp(max=32).unsqueeze(-1)
    ok = torch.equal(a[0], b[0]) and torch.equal(a[2][used], b[2][used]) and torch.equal(a[1][used].view(torch.int16), b[1][used].view(torch.int16))
    if uc:
        ok = ok and torch.equal(a[3], b[3])
    r = dict(check=tag, M=x.shape[0], K=x.shape[1], N=wg.shape[0], dtype=str(x.dtype), equal=bool(ok),
             active=float(b[0].sum()) / x.shape[0], overflow=int((b[0] > 32).sum()), broken=dict(gp._BROKEN))
    print(r, flush=True); rows.append(r)

for dtype in (torch.bfloat16, torch.float16):
    for (M, K, N) in [(1, 2048, 5632), (100, 2048, 5632), (3000, 2048, 5632), (16384, 2048, 5632), (777, 4096, 14336), (300, 896, 4864), (130, 96, 1000), (513, 2048, 700)]:
        x, wg, _, _ = make_sparse_ffn(M, K, N, 30, pattern="iid", dtype=dtype, device="cuda", seed=M)
        compare("iid30", x, wg, uc=(M == 3000))
    # extremes: dense rows, NaN row, all-zero, overflow
    x, wg, _, _ = make_sparse_ffn(1000, 2048, 5632, 30, pattern="iid", dtype=dtype, device="cuda", seed=5)
    x[3] = x[3].abs() * 0 + 0.05; wg2 = wg.clone(); x[7] = float("nan"); x[11] = 0
    compare("extremes", x, wg2)
    xr = torch.randn(700, 2048, dtype=dtype, device="cuda"); wr = torch.randn(5632, 2048, dtype=dtype, device="cuda") * 0.02
    compare("random-50pct", xr, wr, uc=True)

# timing: gate_pack ws / triton / cuBLAS gate, weights rotated over 4 sets
for M in [int(m) for m in os.environ.get("MS", "2048,4096,16384,131072").split(",")]:
    W = _weights(2048, 5632, 30, "iid", torch.bfloat16)
    x = _x(M, 2048, torch.bfloat16)
    reps = 60 if M <= 16384 else 20
    res = {}
    for _ in range(2):
        for name, ws in (("ws", "auto"), ("triton", "never")):
            with override("gate", use_ws=ws):
                res.setdefault(name, []).append(_time([(lambda wg=w[0]: gp.gate_pack_arrays(x, wg)) for w in W], reps)[0])
        res.setdefault("cublas", []).append(_time([(lambda wg=w[0]: F.linear(x, wg)) for w in W], reps)[0])
    r = dict(check="time", M=M, **{k: v for k, v in res.items()}, ws_over_cublas=min(res["ws"]) / min(res["cublas"]),
             triton_over_cublas=min(res["triton"]) / min(res["cublas"]), gpu=torch.cuda.get_device_name())
    print(r, flush=True); rows.append(r)

json.dump(rows, open(os.path.join(out, "ws_gpu.json"), "w"), indent=1)
