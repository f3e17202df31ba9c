"""``twell bench kernels --from-model DIR --data PATH``: kernel rows on real activations.

The model runs over the text once; the inputs of its first L gated MLPs (L = ``layers`` of the
options, 4 by default) are captured with a forward pre-hook, and each layer's own weights and
inputs form one of the L rotated weight sets. Rows carry ``pattern = "real:<model name>"`` and
the measured active units per token, union density and tile maximum of those inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .capture import capture_mlp_inputs, load_model, load_tokenizer, read_texts, token_blocks
from .registry import Case
from .runner import BenchOptions, BenchResult, _activity, _check_cases, _Session

__all__ = ["run_real", "capture_layers"]


@torch.no_grad()
def capture_layers(
    model, input_ids: torch.Tensor, layers: int, batch: int = 4
) -> list[tuple[torch.Tensor, tuple]]:
    """``[(x [T, K], (w_gate, w_up, w_down))]`` for the first ``layers`` gated MLPs of ``model``
    over ``input_ids [B, S]`` (T = B * S tokens)."""
    from .capture import gated_mlps

    mlps = gated_mlps(model)[:layers]
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(mlps))}

    def keep(i, name, x2d, mod):
        if i < len(mlps):
            got[i].append(x2d.clone())

    device = next(model.parameters()).device
    with capture_mlp_inputs(model, keep):
        for s in range(0, input_ids.shape[0], batch):
            model(input_ids=input_ids[s : s + batch].to(device), use_cache=False)
    out = []
    for i, (_, m) in enumerate(mlps):
        w = (m.gate_proj.weight.detach(), m.up_proj.weight.detach(), m.down_proj.weight.detach())
        out.append((torch.cat(got[i]), w))
    return out


def run_real(
    model_dir: str | Path,
    data: str | Path,
    opts: BenchOptions,
    cases: list[Case],
    *,
    out_dir=None,
    console=None,
    tokenizer: str | Path | None = None,
    seq_len: int = 512,
) -> BenchResult:
    """Kernel rows (every op and M of ``cases``; their shapes, actives and patterns are replaced by
    the model's) on the captured activations of ``model_dir`` over ``data``."""
    # only ops, Ms and providers of the cases apply: shape, actives and patterns come from the model
    cases = [c.with_(shape="tiny", actives=(1.0,), patterns=("iid",)) for c in cases]
    _check_cases(cases, opts)
    ses = _Session(opts, "kernels", out_dir, console)
    try:
        model = load_model(model_dir, ses.device, ses.dtype)
        tok = load_tokenizer(tokenizer or model_dir)
        Ms = sorted({M for c in cases for M in c.Ms})
        ids = token_blocks(tok, read_texts(data), min(seq_len, max(Ms)), max(Ms))
        captured = capture_layers(model, ids, opts.layers)
        del model
        T = min(x.shape[0] for x, _ in captured)
        name = Path(model_dir).resolve().name
        K = captured[0][0].shape[1]
        N = captured[0][1][0].shape[0]
        weights = [w for _, w in captured]
        xs_all = [x for x, _ in captured]
        ok = [M for M in Ms if M <= T]
        if len(ok) < len(Ms):
            ses.say(f"[yellow]the text gave {T} tokens: M > {T} skipped[/yellow]")
        per_layer = [_activity(x, [w], ok, opts.tile, opts.slots) for x, w in captured]
        for c in cases:
            dy = None
            if "ffn_fwdbwd" in c.ops:
                dy = torch.randn(T, K, device=ses.device, dtype=ses.dtype)
            for M in [M for M in c.Ms if M <= T]:
                act = {k: sum(pl[M][k] for pl in per_layer) / len(per_layer) for k in per_layer[0][M]}
                act["tile_max"] = max(pl[M]["tile_max"] for pl in per_layer)
                ses.points(
                    c.ops,
                    M=M,
                    shape_name=f"{name}-{K}x{N}",
                    K=K,
                    N=N,
                    pattern=f"real:{name}",
                    target=act["active"],
                    act=act,
                    xs=[x[:M] for x in xs_all],
                    weights=weights,
                    dy=dy,
                    providers=c.providers,
                )
    finally:
        res = ses.close()
    return res
