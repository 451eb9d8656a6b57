"""tools/find_python.sh, which the Makefile uses for a new venv: a Python 3.12, or one line."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "find_python.sh")


def test_finds_this_python_on_path(tmp_path):
    (tmp_path / "python3.12").symlink_to(sys.executable)
    env = dict(os.environ, PATH=str(tmp_path))
    out = subprocess.run(["/bin/bash", SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    found = out.stdout.strip()
    check = subprocess.run([found, "-c", "import sys; print(sys.version_info[:2])"],
                           capture_output=True, text=True)
    assert check.stdout.strip() == "(3, 12)"


def test_a_shim_that_refuses_and_no_pyenv_give_one_line(tmp_path):
    shim = tmp_path / "python3.12"  # as pyenv's shim does until a version is selected
    shim.write_text("#!/bin/sh\necho 'pyenv: python3.12: command not found' >&2\nexit 127\n")
    shim.chmod(0o755)
    env = dict(os.environ, PATH=str(tmp_path))
    out = subprocess.run(["/bin/bash", SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "k2mcore needs Python 3.12: install it (pyenv install 3.12, or your system's python3.12 "
        "with venv), or pass PYTHON=/path/to/python3.12"]
