"""The layers import downward only (docs/architecture.md): graph -> models -> checkpoint -> data -> training ->
finetune -> the user API -> the tools (configs, data_prep, experiments). Parsed from the sources, so a new
upward import fails here rather than in a later refactor."""
import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Unit -> rank; a unit may import units of lower rank, and itself.
RANKS = {
    "jmp_jax.host_memory": 0, "jmp_jax.cli": 0, "jmp_jax.tasks": 0, "jmp_jax.program_store": 0,
    "jmp_jax.compilation_cache": 1,
    "jmp_jax.graph": 1,
    "jmp_jax.models": 2,
    "jmp_jax.checkpoint": 3,
    "jmp_jax.data": 4,
    "jmp_jax.training": 5,
    "jmp_jax.finetune": 6,
    "jmp_jax.pretrained": 7, "jmp_jax.evaluation": 7, "jmp_jax.convert": 7,
    "jmp_jax.ase_calculator": 8, "jmp_jax": 8,  # the package's lazy `load_pretrained`
    "configs": 9, "data_prep": 9,
    "experiments": 10,
}
PACKAGES = ("jmp_jax", "configs", "data_prep", "experiments")


def unit_of(module: str) -> str | None:
    """The layer unit of a dotted module name (None outside the project)."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    if parts[0] == "jmp_jax" and len(parts) > 1 and ".".join(parts[:2]) in RANKS:
        return ".".join(parts[:2])
    return parts[0]


def imported_modules(path: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file, at any depth (lazy imports count too)."""
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                candidate = f"{base}.{alias.name}"
                sub = os.path.join(REPO, *candidate.split("."))
                found.append((node.lineno, candidate if os.path.isdir(sub) or os.path.exists(sub + ".py") else base))
    return found


def project_files():
    for package in PACKAGES:
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    yield path, rel.removesuffix(".__init__")


def test_every_import_points_down_the_layers():
    upward = []
    for path, module in project_files():
        here = unit_of(module)
        for line, target in imported_modules(path, module):
            there = unit_of(target)
            if there is not None and there != here and RANKS[there] >= RANKS[here]:
                upward.append(f"{os.path.relpath(path, REPO)}:{line} ({here}) imports {target} ({there})")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_every_library_module_has_a_layer():
    units = {unit_of(module) for _, module in project_files() if module.startswith("jmp_jax.")}
    assert units <= set(RANKS), f"modules outside the layer table: {sorted(units - set(RANKS))}"


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from jmp_jax.training import loop\n")
    assert [unit_of(t) for _, t in imported_modules(str(path), "jmp_jax.graph.probe")] == ["jmp_jax.training"]


@pytest.mark.parametrize("entry", ["experiments.pretrain", "experiments.finetune", "jmp_jax.ase_calculator"])
def test_training_and_inference_entry_points_import_neither_tensorflow_nor_torch(entry):
    """Both are installed here (tf.data readers, data_prep, the torch cross-checks), and each would cost every
    training process seconds of start-up and hundreds of MB of host memory."""
    probe = f"import sys, {entry}\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & {{'tensorflow', 'torch'}}))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
