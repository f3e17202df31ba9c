"""``twell demo --quick``: trains, reports sparsity, generates text and prints the timing table."""

from __future__ import annotations

import pytest

from twell.cli import main as cli_main


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--no-progress", "--new-tokens", "8", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    for expected in ("sparsity reached", "active units / token", "zeros in FFN hidden", "the sparse model writes",
                     "In the beginning", "HACKER, n.", "dense vs twell FFN", "dense"):  # fmt: skip
        assert expected in text, f"{expected!r} missing from the demo output"
    assert (out / "metrics.jsonl").is_file() and (out / "final" / "config.json").is_file()
