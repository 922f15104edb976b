"""The throughput and latency benchmarks run end to end on the narrow demo model (so they do not rot),
print their table and leave BENCHMARKS.md alone under --no-report."""
from __future__ import annotations

import os

import numpy as np
import pytest

from bench import bench_finetune, bench_inference, bench_model, bench_profile, common
from configs.finetune import common as finetune_configs
from jmp_jax.data import budget_plan
from jmp_jax.finetune import loop
from jmp_jax.finetune import loss as loss_lib


def table_rows(printed: str) -> list[list[str]]:
    """Cells of the data rows of the one markdown table in `printed`."""
    lines = [line for line in printed.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


@pytest.fixture
def benchmarks_md_unchanged():
    before = os.stat(common.BENCHMARKS_MD).st_mtime_ns, open(common.BENCHMARKS_MD).read()
    yield
    assert (os.stat(common.BENCHMARKS_MD).st_mtime_ns, open(common.BENCHMARKS_MD).read()) == before


def test_bench_finetune_smoke(capsys, benchmarks_md_unchanged):
    bench_finetune.main(["--config", "demo", "--tasks", "qm9_U_0", "--steps", "1", "--max-batch-size", "3",
                         "--no-report"])
    rows = table_rows(capsys.readouterr().out)
    assert [r[:6] for r in rows] == [["QM9 U_0 (C3-C7 alkanes)", "scalar", "float32", "3 (JMP: 48)", "3",
                                      str(11 + 14 + 17)]]
    compile_s, step_ms, steps_per_s, atoms_per_s = (float(rows[0][i].split()[0]) for i in (8, 9, 10, 12))
    assert compile_s > 0 and step_ms > 0 and steps_per_s == pytest.approx(1e3 / step_ms, rel=0.01, abs=0.006)
    assert atoms_per_s == pytest.approx(42 * steps_per_s, rel=0.01, abs=1)


def test_bench_finetune_rmd17_task_follows_jmp_recipe():
    """The gradient-force rows (not compiled here): one frame per batch with its force labels, JMP's force
    loss (coefficient 100, the molecule's force std) and JMP's rMD17 cutoff."""
    config = finetune_configs.get_config("rmd17", "aspirin,demo")
    spec = loop.data_spec(config)
    rng = np.random.default_rng(0)
    records = [bench_finetune.record(bench_model.alkane(6, s), s, rng) for s in range(4)]
    budgets = budget_plan.plan_budgets(records, spec.settings(0), spec.batch_size, config.seed)
    batch = bench_finetune.first_batch(records, spec, budgets)
    assert int(batch.graphs.graph.globals["mask"].sum()) == 1 and spec.settings(20).cutoff == 7.0
    np.testing.assert_allclose(batch.forces[:20], records[0]["forces"], rtol=1e-6)
    assert bench_finetune.normalization(config.task) == loss_lib.Normalization(
        force_std=finetune_configs.RMD17_FORCE_STD["aspirin"], coefficient=100.0)


def test_bench_inference_smoke(capsys, benchmarks_md_unchanged):
    bench_inference.main(["--config", "demo", "--structures", "molecule", "--forces", "direct", "--calls", "2",
                          "--no-report"])
    rows = table_rows(capsys.readouterr().out)
    assert [r[:4] for r in rows] == [["molecule", "20", "ani1x", "direct"]]
    assert float(rows[0][4]) > 0 and float(rows[0][5]) > 0 and float(rows[0][6]) > 0
    assert rows[0][9] == "0 of 4"  # the molecule's moved steps keep the first call's padded shape


def test_bench_profile_groups_kernels_by_what_they_compute(tmp_path):
    """A product, a gather and a sum, each timed in a real trace and put in its group."""
    import jax
    import jax.numpy as jnp

    program = jax.jit(lambda a, idx: jnp.sum(jnp.exp(a @ a.T)[idx] * 2.0, axis=0)).lower(
        jnp.ones((256, 256)), jnp.arange(128)).compile()
    groups = bench_profile.kernel_groups(program.as_text())
    assert {"matrix products", "gathers", "reductions"} <= set(groups.values()), groups
    program(jnp.ones((256, 256)), jnp.arange(128)).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        program(jnp.ones((256, 256)), jnp.arange(128)).block_until_ready()
    seconds, unmatched = bench_profile.kernel_seconds(str(tmp_path), groups)
    assert seconds["matrix products"] > 0 and unmatched == 0, (seconds, unmatched)


def test_bench_profile_smoke(capsys, benchmarks_md_unchanged):
    bench_profile.main(["--config", "demo", "--batches", "molecules", "--no-report"])
    rows = table_rows(capsys.readouterr().out)
    assert [r[1] for r in rows] == [*bench_profile.GROUPS, "unmatched kernels", "all kernels (step wall time)"]
    shares = [float(r[3].rstrip("%")) for r in rows[:-1]]
    assert sum(shares) == pytest.approx(100, abs=len(shares)) and shares[0] > 0
    assert float(rows[-2][2]) < 0.05 * float(rows[-1][2].split()[0])  # nearly every kernel is named



def test_bench_profile_names_the_model_layer_of_each_kernel():
    """Layers from jax's op_names: the interaction inside a block (block numbers and recomputation wrappers
    elided), else the backbone's or model's submodule; kernels of a real program keep their scopes."""
    import jax
    import jax.numpy as jnp

    recomputed = ("jit(g)/transpose(jvp())/JMPModel/backbone/transpose(JMPModel)/backbone/jvp(int_blocks_2)/"
                  "quad_interaction/mlp_sbf/dot_general")
    assert bench_profile.module_of(recomputed) == "int_blocks/quad_interaction"
    jitted = ("jit(g)/transpose(jvp())/JMPModel/backbone/int_blocks_0/transpose(jvp(jit(_apply)))/"
              "InteractionBlock/quad_interaction/mlp_sbf/dot_general")
    assert bench_profile.module_of(jitted) == "int_blocks/quad_interaction"
    block = "jit(g)/jvp()/JMPModel/backbone/out_blocks_3/layers_0/dense_mlp_1/dot_general"
    assert bench_profile.module_of(block) == "out_blocks"
    assert bench_profile.module_of("jit(g)/jvp()/JMPModel/output/out_energy_0/dot_general") == "output"
    assert bench_profile.module_of("jit(g)/jvp()/reduce_sum") == "outside the model"

    def scoped(a):
        with jax.named_scope("JMPModel"), jax.named_scope("backbone"):
            with jax.named_scope("int_blocks_1"), jax.named_scope("trip_interaction"):
                a = a @ a.T
            with jax.named_scope("bases"):
                return jnp.sum(jnp.exp(a), axis=0)

    modules = bench_profile.kernel_modules(jax.jit(scoped).lower(jnp.ones((64, 64))).compile().as_text())
    assert {"int_blocks/trip_interaction", "bases"} <= set(modules.values()), modules
