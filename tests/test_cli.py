"""The command line: `twell --help`, `python -m twell` and the demo."""

import subprocess
import sys

from twell.cli import build_parser, main


def test_help_lists_demo(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "twell", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "COMMAND" in r.stdout


def test_parser_knows_every_installed_subcommand():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "demo" in sub.choices
    assert parser.parse_args(["demo"]).command == "demo"
