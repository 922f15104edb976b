"""`ruff check` over the repository with its ruff.toml: lint runs wherever the suite runs, CI included."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_passes():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff check failed:\n{result.stdout}{result.stderr}"
