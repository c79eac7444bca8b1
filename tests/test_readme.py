"""The README's quick start must stay true: its onnxopt commands run as written."""

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def quick_start_commands() -> list[str]:
    """Every `onnxopt ...` command in an indented block of the README, after any `pip install ... &&`."""
    found = []
    for line in README.splitlines():
        m = re.match(r"^ {4}(?:pip install [^&]+&& )?(onnxopt .*)$", line)
        if m and "IN.onnx" not in m.group(1) and "A.onnx" not in m.group(1):
            found.append(m.group(1))
    return found


def test_readme_has_a_quick_start_and_a_test_command():
    assert quick_start_commands(), "README shows no runnable onnxopt command"
    assert re.search(r"^ {4}pip install '\.\[test\]' && python -m pytest -q$", README, re.M)


@pytest.mark.slow
@pytest.mark.parametrize("command", quick_start_commands())
def test_readme_command_runs(command, tmp_path):
    argv = shlex.split(command)
    argv = [str(ROOT / a) if a.startswith("models/") else a for a in argv]
    p = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "PASS" in p.stdout
    for report in tmp_path.glob("*.json"):
        assert json.loads(report.read_text())["validation"]["passed"]
