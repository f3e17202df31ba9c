"""``twell train``: configs, the L1 schedule, the acceptance runs (tiny preset, exact resume,
2-process DDP on CPU) and ReLUfication from a local checkpoint."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from twell.cli import main as cli_main
from twell.train import PRESETS, get_preset, l1_coeff_at, latest_checkpoint, train
from twell.train.config import TrainConfig
from twell.train.tracking import read_metrics

# A model small enough for a few CPU steps in seconds (vocabulary: the embedded tokenizer's 8,192).
SMALL = dict(
    hidden_size=64, intermediate_size=256, num_layers=2, num_heads=2, seq_len=64, micro_batch_size=2,
    warmup_steps=2, val_blocks=4, eval_every=0, progress=False, plots=False, save_final=False, log_every=1000,
)  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each run builds its own Accelerator; accelerate keeps process-wide singletons between them."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _train_records(out_dir) -> list[dict]:
    return [r for r in read_metrics(os.path.join(out_dir, "metrics.jsonl")) if r["event"] == "train"]


# ---------------------------------------------------------------- config and schedule


def test_paper_presets_match_the_paper_shapes():
    for name, layers in (("0.5b", 8), ("1b", 18), ("1.5b", 28), ("2b", 38)):
        c = get_preset(name)
        assert (c.hidden_size, c.intermediate_size, c.num_layers) == (2048, 5632, layers), name
        assert (c.num_heads, c.num_kv_heads, c.vocab_size, c.seq_len) == (32, 32, 49152, 2048), name
        assert c.tie_embeddings and c.precision == "bf16"
        assert (c.lr, c.weight_decay, c.beta1, c.beta2, c.warmup_steps, c.grad_clip) == (
            1e-3,
            0.1,
            0.9,
            0.95,
            600,
            1.0,
        )
        # 8 sequences x 64 micro-steps x 2048 tokens = the paper's 1,048,576 tokens per step on one process
        assert c.micro_batch_size * c.grad_accum * c.seq_len == 1 << 20
    assert set(PRESETS) == {"tiny", "0.5b", "1b", "1.5b", "2b"}
    assert get_preset("tiny").paper_l1_coeff == pytest.approx(get_preset("tiny").l1_coeff * 704)


def test_flags_override_any_field():
    from twell.cli import build_parser

    args = build_parser().parse_args(
        ["train", "--preset", "1b", "--grad-accum", "8", "--l1-coeff", "0", "--no-activation-checkpointing",
         "--num-kv-heads", "8", "--streaming", "--dataset", "x/y"]
    )  # fmt: skip
    from twell.train.config import config_from_args

    c = config_from_args(args)
    assert (c.num_layers, c.grad_accum, c.l1_coeff, c.num_kv_heads) == (18, 8, 0.0, 8)
    assert c.activation_checkpointing is False and c.streaming is True and c.dataset == "x/y"
    assert c.hidden_size == 2048, "fields not given keep the preset's value"
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for n in names:
        assert "--" + n.replace("_", "-") in help_text, f"field {n} has no flag"


@pytest.mark.parametrize(
    "field,value,match",
    [("hidden_size", 0, "hidden_size"), ("num_heads", 3, "num_heads"), ("l1_coeff", -1.0, "l1_coeff"),
     ("l1_schedule", "cubic", "l1_schedule"), ("precision", "fp8", "precision"), ("val_fraction", 1.0, "val_fraction"),
     ("backend", "cuda", "backend"), ("grad_accum", 0, "grad_accum")],
)  # fmt: skip
def test_bad_config_raises_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        get_preset("tiny", **{field: value})
    with pytest.raises(ValueError, match="preset"):
        get_preset("7b")


def test_l1_schedule():
    assert [l1_coeff_at(s, 1.0) for s in (0, 5, 100)] == [1.0, 1.0, 1.0]
    lin = [l1_coeff_at(s, 2.0, "linear", warmup_steps=4) for s in range(6)]
    assert lin == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    # the paper's sparsity warm-up: no L1, then a ramp
    d = [l1_coeff_at(s, 1.0, "linear", warmup_steps=2, delay_steps=3) for s in range(7)]
    assert d == pytest.approx([0, 0, 0, 0.5, 1.0, 1.0, 1.0])
    assert l1_coeff_at(1, 1.0, "constant", delay_steps=2) == 0.0
    with pytest.raises(ValueError, match="schedule"):
        l1_coeff_at(0, 1.0, "cosine")


# ---------------------------------------------------------------- acceptance runs


def test_small_ffn_calls_warn_on_cuda_only(monkeypatch):
    # a sparse run whose FFN calls are below the training op's small-call rule says so at start
    from twell.ops import ffn_train as ft
    from twell.train.loop import _small_calls_note

    monkeypatch.setattr(ft.CONFIG, "dense_below_m", 16384)
    cfg = get_preset("0.5b")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    note = _small_calls_note(4096, cuda, cfg)
    assert note is not None and "4,096" in note and "16,384" in note and "--micro-batch-size" in note
    assert _small_calls_note(16384, cuda, cfg) is None  # the kernels run from 16384 tokens
    assert _small_calls_note(4096, cpu, cfg) is None  # the rule is CUDA-only
    for change in ({"sparse_mlp": False, "l1_coeff": 0.0}, {"backend": "reference"}):
        assert _small_calls_note(4096, cuda, dataclasses.replace(cfg, **change)) is None


def test_tiny_preset_20_steps_loss_and_l1_fall(tmp_path):
    """Acceptance: `twell train --preset tiny --max-steps 20` on CPU; CE and the L1 statistic fall."""
    out = tmp_path / "tiny"
    rc = cli_main(
        ["train", "--preset", "tiny", "--max-steps", "20", "--output-dir", str(out), "--no-progress"]
    )
    assert rc == 0
    recs = read_metrics(out / "metrics.jsonl")
    assert recs[0]["event"] == "start" and recs[0]["env"]["torch"] == torch.__version__
    train_recs = [r for r in recs if r["event"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, 21))
    ce = [r["ce"] for r in train_recs]
    l1 = [r["l1"] for r in train_recs]
    assert all(math.isfinite(x) for x in ce + l1)
    assert ce[0] == pytest.approx(math.log(8192), rel=0.05), "an untrained model predicts ~uniformly"
    assert sum(ce[-3:]) / 3 < ce[0] - 0.5, f"CE did not fall: {ce}"
    assert sum(l1[-3:]) / 3 < 0.5 * l1[0], f"the L1 statistic did not fall: {l1}"
    last = train_recs[-1]
    assert last["active_min"] <= last["active_mean"] <= last["active_max"] <= 704
    assert len(last["active_per_layer"]) == 4 and last["tokens"] == 20 * 8 * 256
    assert last["tokens_per_s"] > 0 and last["peak_mem_mib"] > 0
    evals = [r for r in recs if r["event"] == "eval"]
    assert (
        evals
        and evals[-1]["step"] == 20
        and evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_ce"]))
    )
    assert evals[-1]["val_ce"] < ce[0]
    for png in ("loss.png", "sparsity.png"):
        assert (out / png).stat().st_size > 1000
    # the final model loads as a twell model, and as a plain ReLU Llama in transformers
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    import twell
    import twell.models  # noqa: F401  (registers the model type)

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert sum(isinstance(m, twell.SparseGatedMLP) for m in model.modules()) == 4
    assert model.config.hidden_act == "relu" and model.config.tie_word_embeddings
    plain = LlamaForCausalLM.from_pretrained(out / "final")
    ids = torch.randint(0, 8192, (1, 16))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-4, rtol=1e-4)
    assert (out / "final" / "tokenizer.json").is_file()


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    # The dead-unit window (5 steps x 128 tokens) spans the checkpoint at step 3, so its counts are
    # part of what must be restored.
    cfg = get_preset("tiny", **SMALL, max_steps=6, dead_window_tokens=5 * 128)
    full = train(dataclasses.replace(cfg, output_dir=str(tmp_path / "full")))
    first = train(dataclasses.replace(cfg, output_dir=str(tmp_path / "cut"), save_every=3))
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_0000006")  # as if stopped after step 3
    assert latest_checkpoint(tmp_path / "cut").name == "step_0000003"
    resumed = train(dataclasses.replace(cfg, output_dir=str(tmp_path / "cut"), resume="latest"))
    assert [r["ce"] for r in first.history if r["event"] == "train"] == [
        r["ce"] for r in full.history if r["event"] == "train"
    ]
    a = _train_records(tmp_path / "full")
    b = _train_records(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 7)), "the resumed log must hold each step once"
    for key in ("ce", "l1", "lr", "active_per_layer", "grad_norm", "dead_frac"):
        assert [r[key] for r in a] == [r[key] for r in b], f"{key} differs after resume"
    assert a[4]["dead_frac"] is not None
    assert resumed.final_eval["val_ce"] == full.final_eval["val_ce"]
    # weights match too
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n


def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    """2 gloo processes (accelerate launch) x 1 micro-step == 1 process x 2 micro-steps."""
    flags = ["--hidden-size", "64", "--intermediate-size", "256", "--num-layers", "2", "--num-heads", "2",
             "--seq-len", "64", "--micro-batch-size", "2", "--warmup-steps", "2", "--val-blocks", "4",
             "--max-steps", "4", "--eval-every", "0", "--no-progress", "--no-plots", "--no-save-final"]  # fmt: skip
    assert cli_main(["train", *flags, "--grad-accum", "2", "--output-dir", str(tmp_path / "one")]) == 0
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(29500 + os.getpid() % 1000), "-m", "twell.cli"]  # fmt: skip
    proc = subprocess.run(
        [*launcher, "train", *flags, "--grad-accum", "1", "--output-dir", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    start = read_metrics(tmp_path / "two" / "metrics.jsonl")[0]
    assert start["processes"] == 2 and "MULTI_CPU" in start["distributed"]
    one, two = _train_records(tmp_path / "one"), _train_records(tmp_path / "two")
    assert len(two) == 4, "only the main process writes the log"
    for key in ("ce", "l1", "active_mean"):
        for r1, r2 in zip(one, two):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-6), f"{key} at step {r1['step']}"
    assert two[-1]["tokens"] == one[-1]["tokens"]
    v1 = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["event"] == "eval"][-1]
    v2 = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["event"] == "eval"][-1]
    assert v2["val_ce"] == pytest.approx(v1["val_ce"], rel=1e-5)


def test_l1_zero_is_the_dense_baseline_and_linear_schedule_is_logged(tmp_path):
    dense = train(get_preset("tiny", **SMALL, max_steps=2, l1_coeff=0.0, output_dir=str(tmp_path / "d")))
    recs = [r for r in dense.history if r["event"] == "train"]
    assert all(r["l1_coeff"] == 0.0 and r["loss"] == r["ce"] for r in recs)
    assert recs[-1]["active_mean"] > 0, "statistics are still collected without the penalty"
    ramp = train(
        get_preset(
            "tiny", **SMALL, max_steps=3, l1_coeff=0.3, l1_schedule="linear", l1_warmup_steps=2, l1_delay_steps=1,
            output_dir=str(tmp_path / "r"),
        )
    )  # fmt: skip
    assert [r["l1_coeff"] for r in ramp.history if r["event"] == "train"] == pytest.approx([0.0, 0.15, 0.3])


def test_init_from_relufies_a_silu_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    import twell

    src = tmp_path / "silu"
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, hidden_act="silu", tie_word_embeddings=True)
    ).save_pretrained(src)  # fmt: skip
    cfg = get_preset(
        "tiny",
        **{**SMALL, "save_final": True},
        max_steps=2,
        init_from=str(src),
        output_dir=str(tmp_path / "o"),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = train(cfg)
    assert any("ReLU" in str(w.message) for w in caught), "switching SiLU to ReLU must warn"
    mlps = [m for m in res.model.modules() if isinstance(m, twell.SparseGatedMLP)]
    assert len(mlps) == 2 and mlps[0].intermediate_size == 128, "the checkpoint's shape, not the preset's"
    assert res.model.config.hidden_act == "relu"
    first = next(r for r in res.history if r["event"] == "train")
    assert first["ce"] < 9.5 and first["active_mean"] < 128
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "o" / "final").hidden_act == "relu"
    with pytest.raises(ValueError, match="vocabulary"):
        small_vocab = tmp_path / "v"
        LlamaForCausalLM(
            LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, tie_word_embeddings=True)
        ).save_pretrained(small_vocab)  # fmt: skip
        train(dataclasses.replace(cfg, init_from=str(small_vocab), output_dir=str(tmp_path / "o2")))


def test_resume_without_checkpoint_raises(tmp_path):
    with pytest.raises(ValueError, match="resume"):
        train(get_preset("tiny", **SMALL, max_steps=1, resume="latest", output_dir=str(tmp_path)))


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path):
    cfg = get_preset("tiny", **SMALL, max_steps=2, dead_window_tokens=128)
    plain = train(dataclasses.replace(cfg, output_dir=str(tmp_path / "a")))
    ckpt = train(dataclasses.replace(cfg, output_dir=str(tmp_path / "b"), activation_checkpointing=True))
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.model.modules())
    a = [r for r in plain.history if r["event"] == "train"]
    b = [r for r in ckpt.history if r["event"] == "train"]
    for key in ("ce", "l1", "grad_norm", "dead_frac"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5), key
    for ra, rb in zip(a, b):
        assert ra["active_per_layer"] == pytest.approx(rb["active_per_layer"], rel=1e-5)


def test_trackers_and_metrics_log(tmp_path):
    from twell.train.loop import _trackers
    from twell.train.tracking import MetricsLog, plot_run

    assert _trackers(get_preset("tiny", trackers="none")) == []
    with pytest.raises(ValueError, match="trackers"):
        _trackers(get_preset("tiny", trackers="mlflow"))
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write({"event": "train", "step": 1, "ce": float("nan"), "l1": 1.0})
    log.write({"event": "train", "step": 2, "ce": 2.0, "l1": float("inf")})
    recs = read_metrics(tmp_path / "m.jsonl")
    assert recs[0]["ce"] is None and recs[1]["l1"] is None, "non-finite floats are stored as null"
    assert [r["step"] for r in log.truncate_after(1)] == [1]
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1]
    assert plot_run([], tmp_path) == []


def test_dense_mlp_baseline_matches_sparse_mlp_without_l1(tmp_path):
    """sparse_mlp=False keeps HF's dense ReLU MLP (the throughput baseline): same init, same losses
    as the sparse MLP with L1 = 0, and sparsity measured at evaluation."""
    from transformers import LlamaForCausalLM

    cfg = get_preset("tiny", **SMALL, max_steps=3, l1_coeff=0.0, backend="reference")
    sparse = train(dataclasses.replace(cfg, output_dir=str(tmp_path / "s")))
    dense = train(dataclasses.replace(cfg, output_dir=str(tmp_path / "d"), sparse_mlp=False))
    assert type(dense.model) is LlamaForCausalLM
    assert not any(type(m).__name__ == "SparseGatedMLP" for m in dense.model.modules()), "eval must restore"
    a = [r for r in sparse.history if r["event"] == "train"]
    b = [r for r in dense.history if r["event"] == "train"]
    assert [r["ce"] for r in b] == pytest.approx([r["ce"] for r in a], rel=1e-5)
    assert b[-1]["active_mean"] is None and b[-1]["l1"] is None
    ea, eb = sparse.final_eval, dense.final_eval
    for key in ("val_ce", "val_active", "val_never_active"):
        assert eb[key] == pytest.approx(ea[key], rel=1e-4), key
    assert 0 < eb["val_active"] < 256 and len(eb["val_active_per_layer"]) == 2
    with pytest.raises(ValueError, match="sparse_mlp"):
        get_preset("tiny", sparse_mlp=False, l1_coeff=1e-3)
