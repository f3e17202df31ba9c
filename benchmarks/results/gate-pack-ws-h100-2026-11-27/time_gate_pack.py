import json, os, sys
sys.path.insert(0, "benchmarks")
import torch, torch.nn.functional as F
from dev_infer import _time, _weights, _x
from twell.ops import gate_pack as gp
from twell.ops.configs import override
rows = []
W = _weights(2048, 5632, 30, "iid", torch.bfloat16)
for M in [int(m) for m in os.environ.get("MS", "1024,2048,4096,16384,131072").split(",")]:
    x = _x(M, 2048, torch.bfloat16)
    reps = 60 if M <= 16384 else 16
    res = {}
    for _ in range(2):
        for name, ov in (("ws", {}), ("triton", {"use_ws": "never"})):
            with override("gate", **ov):
                res.setdefault(name, []).append(_time([(lambda wg=w[0]: gp.gate_pack_arrays(x, wg)) for w in W], reps)[0])
        res.setdefault("cublas", []).append(_time([(lambda wg=w[0]: F.linear(x, wg)) for w in W], reps)[0])
    r = dict(M=M, **res, ws_x=min(res["ws"]) / min(res["cublas"]), triton_x=min(res["triton"]) / min(res["cublas"]))
    print(r, flush=True); rows.append(r)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "ws_time2.json"), "w"))
