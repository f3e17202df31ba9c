"""Every Python example of the README runs as written (in a temporary directory)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[i], f"README example {i}", "exec"), {})


def test_two_commands_on_top():
    head = README.read_text().split("## Quick start", 1)[0]
    assert "make demo" in head and "make test" in head
    assert len(BLOCKS) >= 2
