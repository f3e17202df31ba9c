"""The README's quick-start example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs():
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README quick start", "exec"), {})


def test_two_commands_on_top():
    head = README.read_text().split("## Quick start", 1)[0]
    assert "make demo" in head and "make test" in head
