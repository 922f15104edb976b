"""No test skips for a missing file: none is written to (static check of every skip in tests/), and
conftest.py reports one that does as failed. Skips for other reasons (the platform) stay explicit."""
import ast
import os
import shutil
import subprocess
import sys

from fixture_files import MISSING_FILE_REASON

TESTS = os.path.dirname(os.path.abspath(__file__))
SKIP_CALLS = ("skip", "skipif")
FILE_CHECKS = ("exists", "isdir", "isfile", "available")


def _skip_calls(tree: ast.AST):
    """(condition source, reason text) of every pytest.skip(...) / pytest.mark.skipif(...) call."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SKIP_CALLS:
            args = list(node.args) + [k.value for k in node.keywords]
            strings = [s.value for a in args for s in ast.walk(a) if isinstance(s, ast.Constant)
                       and isinstance(s.value, str)]
            yield ast.unparse(node), " ".join(strings)


def test_no_test_skips_for_a_missing_file():
    offenders = []
    for name in sorted(os.listdir(TESTS)):
        if name.endswith(".py") and name != os.path.basename(__file__):
            with open(os.path.join(TESTS, name)) as f:
                tree = ast.parse(f.read())
            offenders += [f"{name}: {source}" for source, reason in _skip_calls(tree)
                          if MISSING_FILE_REASON.search(reason) or any(c in source for c in FILE_CHECKS)]
    assert not offenders, "skips for missing files:\n" + "\n".join(offenders)


def test_a_skip_for_a_missing_file_fails_the_run(tmp_path):
    for name in ("conftest.py", "fixture_files.py", "fixture_pretrain.py"):  # conftest imports them
        shutil.copy(os.path.join(TESTS, name), tmp_path / name)
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n\n"
        "def test_needs_a_file():\n    pytest.skip('reference.npz absent')\n\n\n"
        "@pytest.mark.skipif(True, reason='Linux-only')\ndef test_platform():\n    pass\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                             str(tmp_path)], cwd=tmp_path, capture_output=True, text=True)
    assert "1 failed, 1 skipped" in result.stdout, result.stdout + result.stderr
    assert "tests may not skip for a missing file" in result.stdout
