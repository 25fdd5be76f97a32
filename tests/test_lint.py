"""ruff is part of the default suite, so CI keeps the tree clean."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: install the dev extra (pip install -e '.[dev]')")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([ruff, "check", str(root)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
