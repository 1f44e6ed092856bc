"""The code style: every Python file as `ruff format` writes it and clean under `ruff check` (the rules are in
pyproject.toml), and iqstar.py within its size."""

import importlib.util
import subprocess
import sys

import pytest

from conftest import IQSTAR, ROOT, unavailable

IQSTAR_MAX_LINES = 800  # the design's promise (README): one readable file


def ruff(*args, text=None):
    """ruff of this venv (requirements-test.txt pins it), run from the repository root, so pyproject.toml applies."""
    if importlib.util.find_spec("ruff") is None:
        unavailable("ruff is not installed: `make test` installs it (requirements-test.txt)")
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=ROOT, input=text, capture_output=True, text=True, timeout=300
    )


@pytest.mark.process
@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "check"])
def test_ruff_is_clean_on_every_python_file(command):
    result = ruff(*command, "--no-cache", ".")
    if result.returncode != 0:
        pytest.fail(f"ruff {' '.join(command)} . found:\n{result.stdout}{result.stderr}", pytrace=False)


@pytest.mark.process
def test_iqstar_py_is_at_most_800_lines_as_ruff_formats_it():
    """Counted on ruff's formatting of it, so that the count cannot be kept down by packing lines; that the file is
    that formatting already is the format check above."""
    with open(IQSTAR, encoding="utf-8") as f:
        source = f.read()
    result = ruff("format", "--no-cache", "--stdin-filename", "iqstar.py", "-", text=source)
    assert result.returncode == 0, result.stderr
    lines = len(result.stdout.splitlines())
    assert lines <= IQSTAR_MAX_LINES, f"iqstar.py is {lines} lines as ruff formats it, over {IQSTAR_MAX_LINES}"
