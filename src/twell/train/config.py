"""Training configuration: one frozen dataclass, named presets, and the flag <-> field mapping.

Every field of :class:`TrainConfig` is a ``twell train`` flag (``l1_coeff`` -> ``--l1-coeff``);
a preset gives the starting values and flags override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, replace

__all__ = ["TrainConfig", "PRESETS", "get_preset", "add_config_arguments", "config_from_args"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (``global batch = micro_batch_size * grad_accum * world``).

    L1 convention (DESIGN 4.3): ``loss = CE + l1_coeff * mean over layers of (mean over tokens of
    sum over units |h|)``. The paper writes the penalty with an extra 1/N (mean over units), so a
    paper coefficient is ``coeff_paper = l1_coeff * intermediate_size``.
    """

    # --- model (Llama-style decoder, ReLU-gated FFN)
    hidden_size: int = field(default=256, metadata={"help": "model dim K"})
    intermediate_size: int = field(default=704, metadata={"help": "FFN units N"})
    num_layers: int = field(default=4, metadata={"help": "decoder layers"})
    num_heads: int = field(default=4, metadata={"help": "attention heads"})
    num_kv_heads: int | None = field(default=None, metadata={"help": "KV heads (default: num_heads, MHA)"})
    vocab_size: int | None = field(default=None, metadata={"help": "vocabulary (default: the tokenizer's)"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base"})
    tie_embeddings: bool = field(default=True, metadata={"help": "tie input and output embeddings"})
    init_std: float = field(default=0.02, metadata={"help": "weight init std"})
    init_from: str | None = field(
        default=None, metadata={"help": "local HF model dir to start from (ReLUfication of a SiLU model)"}
    )
    # --- sparsity
    l1_coeff: float = field(
        default=5e-3, metadata={"help": "L1 coefficient (DESIGN 4.3 convention); 0 = dense"}
    )
    l1_schedule: str = field(default="constant", metadata={"help": "constant | linear (warm-up ramp)"})
    l1_warmup_steps: int = field(default=0, metadata={"help": "linear: steps of the ramp from 0 to l1_coeff"})
    l1_delay_steps: int = field(default=0, metadata={"help": "steps with no L1 before the schedule starts"})
    tile: int = field(default=256, metadata={"help": "TwELL tile width"})
    slots: int = field(default=32, metadata={"help": "TwELL slots per (row, tile)"})
    backend: str = field(
        default="auto",
        metadata={"help": "sparse FFN backend: auto (kernels on CUDA) | reference (dense torch) | triton"},
    )
    sparse_mlp: bool = field(
        default=True,
        metadata={
            "help": "MLPs as twell.SparseGatedMLP; false: the model's own dense ReLU MLP (the throughput "
            "baseline; sparsity is then measured at evaluation only, and l1_coeff must be 0)"
        },
    )
    dead_window_tokens: int = field(
        default=65536, metadata={"help": "a unit is dead if it never fired over a window of this many tokens"}
    )
    # --- data
    dataset: str = field(
        default="embedded",
        metadata={"help": "embedded | local file/dir (txt, jsonl, json, parquet, csv) | hub name"},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "hub dataset config name"})
    dataset_split: str = field(default="train", metadata={"help": "split to train on"})
    text_field: str = field(default="text", metadata={"help": "column holding the document text"})
    streaming: bool | None = field(
        default=None, metadata={"help": "stream the dataset (default: hub yes, local no)"}
    )
    tokenizer: str = field(
        default="embedded", metadata={"help": "embedded | tokenizer.json | HF tokenizer dir/name"}
    )
    seq_len: int = field(default=256, metadata={"help": "tokens per packed block"})
    val_fraction: float = field(default=0.01, metadata={"help": "held-out documents (non-streaming)"})
    val_docs: int = field(default=2000, metadata={"help": "held-out documents taken first from a stream"})
    val_blocks: int = field(default=64, metadata={"help": "validation blocks evaluated at most"})
    shuffle_buffer: int = field(default=10000, metadata={"help": "streaming shuffle buffer (0: no shuffle)"})
    # --- optimisation
    max_steps: int = field(default=1500, metadata={"help": "optimizer steps"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per process per micro-step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=50, metadata={"help": "linear LR warm-up steps (then cosine to 0)"})
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW weight decay (matrices and embeddings)"}
    )
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    grad_clip: float = field(default=1.0, metadata={"help": "max grad norm (0: no clipping)"})
    # --- runtime
    seed: int = field(default=42, metadata={"help": "seed of init and data order"})
    precision: str = field(
        default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU) | no | bf16 | fp16"}
    )
    cpu: bool = field(default=False, metadata={"help": "run on CPU even where a GPU is present"})
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward"}
    )
    output_dir: str = field(default="runs/tiny", metadata={"help": "logs, checkpoints, plots, final model"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    resume: str | None = field(default=None, metadata={"help": "checkpoint dir, or 'latest' in output_dir"})
    eval_every: int = field(default=250, metadata={"help": "validation every N steps (0: only at the end)"})
    log_every: int = field(
        default=10, metadata={"help": "print a line every N steps (JSONL gets every step)"}
    )
    trackers: str = field(
        default="auto", metadata={"help": "auto (tensorboard if installed) | none | tensorboard,wandb"}
    )
    progress: bool = field(default=True, metadata={"help": "rich progress bar"})
    plots: bool = field(default=True, metadata={"help": "PNG loss and sparsity curves at the end"})
    save_final: bool = field(
        default=True, metadata={"help": "save_pretrained the model + tokenizer at the end"}
    )

    def __post_init__(self) -> None:
        positive = (
            "hidden_size", "intermediate_size", "num_layers", "num_heads", "seq_len", "max_steps",
            "micro_batch_size", "grad_accum", "dead_window_tokens", "tile", "slots", "log_every", "val_blocks",
        )  # fmt: skip
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for name in ("l1_coeff", "lr", "weight_decay", "grad_clip", "init_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)!r}")
        for name in (
            "warmup_steps",
            "l1_warmup_steps",
            "l1_delay_steps",
            "save_every",
            "eval_every",
            "val_docs",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide hidden_size={self.hidden_size}")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_kv_heads: {kv} does not divide num_heads={self.num_heads}")
        if self.l1_schedule not in ("constant", "linear"):
            raise ValueError(f"l1_schedule: expected 'constant' or 'linear', got {self.l1_schedule!r}")
        if self.precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"precision: expected auto, no, bf16 or fp16, got {self.precision!r}")
        if self.backend not in ("auto", "reference", "triton"):
            raise ValueError(f"backend: expected auto, reference or triton, got {self.backend!r}")
        if not self.sparse_mlp and self.l1_coeff > 0:
            raise ValueError(
                f"l1_coeff: {self.l1_coeff} needs sparse_mlp=True (the dense MLP has no L1 statistic)"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: expected in [0, 1), got {self.val_fraction!r}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"beta1/beta2: expected in [0, 1), got {self.beta1!r}, {self.beta2!r}")

    @property
    def paper_l1_coeff(self) -> float:
        """The same penalty in the paper's convention (mean over units): ``l1_coeff * N``."""
        return self.l1_coeff * self.intermediate_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _paper(layers: int) -> dict:
    # Paper Table 2 / released configs: only the depth changes between sizes.
    return dict(
        hidden_size=2048, intermediate_size=5632, num_layers=layers, num_heads=32, num_kv_heads=32,
        vocab_size=49152, rope_theta=10000.0, tie_embeddings=True, seq_len=2048, lr=1e-3,
        warmup_steps=600, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0,
        precision="bf16", micro_batch_size=8, grad_accum=64, l1_coeff=3e-4, activation_checkpointing=True,
        eval_every=1000, log_every=1, dead_window_tokens=1 << 20, val_blocks=256,
    )  # fmt: skip


#: preset name -> field overrides of :class:`TrainConfig`. ``tiny`` (~5.3 M params with the embedded
#: 8,192-token vocabulary) trains on CPU in minutes; the others are the paper's shapes. Their
#: ``grad_accum`` of 64 gives the paper's 512 x 2048 tokens per step on one process: divide by the
#: number of processes (8 GPUs: ``--grad-accum 8``). ``max_steps`` is the paper's per size.
PRESETS: dict[str, dict] = {
    "tiny": {"output_dir": "runs/tiny"},
    "0.5b": {**_paper(8), "max_steps": 10000, "output_dir": "runs/0.5b"},
    "1b": {**_paper(18), "max_steps": 20000, "output_dir": "runs/1b"},
    "1.5b": {**_paper(28), "max_steps": 30000, "output_dir": "runs/1.5b"},
    "2b": {**_paper(38), "max_steps": 40000, "output_dir": "runs/2b"},
}


def get_preset(name: str, **overrides) -> TrainConfig:
    """The preset ``name`` (see :data:`PRESETS`) with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return replace(TrainConfig(**PRESETS[name]), **overrides)


def _base_type(tp):
    """(python type, optional?) of a field annotation such as ``int | None``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def _parse_bool(s: str) -> bool:
    low = s.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field; defaults are ``None`` so that only given flags override."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("config fields (override the preset)")
    for f in fields(TrainConfig):
        tp, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if tp is bool:
            group.add_argument(
                flag, dest=f.name, type=_parse_bool, nargs="?", const=True, default=None,
                help=f"{help_text} (true/false)",
            )  # fmt: skip
            group.add_argument(
                "--no-" + f.name.replace("_", "-"),
                dest=f.name,
                action="store_false",
                default=None,
                help=argparse.SUPPRESS,
            )
        else:
            conv = tp
            if optional:

                def conv(s, _tp=tp):
                    return None if s.lower() == "none" else _tp(s)

            group.add_argument(flag, dest=f.name, type=conv, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset named by ``args.preset`` with every flag that was given applied."""
    overrides = {
        f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None
    }
    return get_preset(getattr(args, "preset", "tiny") or "tiny", **overrides)
