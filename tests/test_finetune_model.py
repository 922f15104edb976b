"""Fine-tuning model pieces: heads, reductions, gradient forces, layer-wise LR groups, plateau, stopping."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import molecule
from ase.data import atomic_masses

from jmp_jax.finetune import heads, optim
from jmp_jax.finetune.model import FinetuneModel, HeadSpec, backbone_for, predict, with_positions
from jmp_jax.graph import batching
from jmp_jax.graph.build import GraphSettings, build_from_atoms
from jmp_jax.training.state import init_variables
from jmp_jax.models.config import demo
from jmp_jax.models.jmp import HeadMLP

SETTINGS = GraphSettings(cutoff=5.0, max_neighbors=12, pbc=(False, False, False))
MOLECULES = ("H2O", "CH3OH")


def _batch(dtype=np.float32):
    graphs = [build_from_atoms(molecule(n), SETTINGS) for n in MOLECULES]
    for g, seed in zip(graphs, (1, 2)):  # break the symmetry of the ideal geometries
        g.positions[:] += np.random.default_rng(seed).normal(scale=0.05, size=g.positions.shape)
    # 2 padding atoms and a padding graph, so masking is exercised.
    budgets = dataclasses.replace(batching.budgets_for(graphs), graphs=3)
    budgets = dataclasses.replace(budgets, nodes=budgets.nodes + 1)
    return batching.collate(graphs, budgets, dtype=dtype)


@pytest.fixture(scope="module")
def batch():
    return _batch()


def test_reduce_atoms_ignores_padding(batch):
    n_real = [len(molecule(n)) for n in MOLECULES]
    values = jnp.arange(batch.num_nodes, dtype=jnp.float32) + 1.0
    first, second = values[:n_real[0]], values[n_real[0]:sum(n_real)]
    for reduction, fn in (("sum", jnp.sum), ("mean", jnp.mean), ("max", jnp.max)):
        got = heads.reduce_atoms(values, batch, reduction)
        np.testing.assert_allclose(got, [fn(first), fn(second), 0.0], rtol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        heads.reduce_atoms(values, batch, "median")


def test_spatial_extent_head(batch):
    """R² = Σ_i x_i |r_i - COM|², with x_i from a bias-free 5-hidden-layer MLP; translation invariant."""
    features = jax.random.normal(jax.random.key(0), (batch.num_nodes, 16))
    head = heads.SpatialExtentHead()
    params = head.init(jax.random.key(1), features, batch)
    layers = params["params"]["mlp"]
    assert sorted(layers) == [f"linear_{j}" for j in range(6)]
    assert all("bias" not in layer for layer in layers.values())

    got = np.asarray(head.apply(params, features, batch))
    x = np.asarray(HeadMLP(1, num_hidden=5, hidden_bias=False).apply(
        {"params": layers}, features))[:, 0]
    nodes = batch.graph.nodes
    pos, z, mask = (np.asarray(nodes[k]) for k in ("positions", "atomic_numbers", "mask"))
    graph = np.asarray(batch.node_graph_index)
    expected = []
    for g in range(2):
        sel = (graph == g) & mask
        m = atomic_masses[z[sel]]
        com = (m[:, None] * pos[sel]).sum(0) / m.sum()
        expected.append(np.sum(x[sel] * np.sum((pos[sel] - com) ** 2, axis=1)))
    np.testing.assert_allclose(got, expected + [0.0], rtol=1e-4, atol=1e-5)

    moved = with_positions(batch, nodes["positions"] + jnp.array([3.0, -1.0, 2.0]))
    np.testing.assert_allclose(head.apply(params, features, moved), got, rtol=1e-4, atol=1e-4)


def test_gradient_forces_equal_minus_finite_difference_energy_derivative():
    """F = -dE/dpos of the fine-tuned energy head, checked against central differences in float64."""
    spec = HeadSpec("forces", gradient_forces=True)
    with jax.enable_x64(True):
        batch = _batch(np.float64)
        # One interaction block keeps the float64 compile short; the blocks are all alike.
        model = FinetuneModel(backbone_for(dataclasses.replace(demo(), num_blocks=1), spec), spec, dtype=jnp.float64)
        variables = jax.tree.map(lambda a: a.astype(jnp.float64), init_variables(model, 0, "none", "demo"))
        # One compiled program (float64 compiles are slow): the energies of the shifted batches are its output too.
        outputs = jax.jit(lambda v, b: predict(model, v, b))
        forces = np.asarray(outputs(variables, batch)["forces"])
        pos = batch.graph.nodes["positions"]
        h = 1e-5
        for atom, axis in ((0, 0), (2, 1), (4, 2)):  # atoms of both molecules
            step = jnp.zeros_like(pos).at[atom, axis].set(h)
            up, down = (outputs(variables, with_positions(batch, pos + d))["energy"].sum() for d in (step, -step))
            derivative = (up - down) / (2 * h)
            np.testing.assert_allclose(forces[atom, axis], -derivative, rtol=1e-5, atol=1e-8)
        assert np.abs(forces[:5]).max() > 0
        assert np.all(forces[~np.asarray(batch.graph.nodes["mask"])] == 0.0)


def test_head_spec_and_backbone_consistency(batch):
    with pytest.raises(ValueError, match="spatial-extent"):
        HeadSpec("scalar", head="spatial_extent", reduction="mean")
    with pytest.raises(ValueError, match="num_classes"):
        HeadSpec("classification", num_classes=1)
    assert backbone_for(demo(), HeadSpec("forces", gradient_forces=False)).direct_forces
    assert not backbone_for(demo(), HeadSpec("forces")).direct_forces
    with pytest.raises(ValueError, match="direct_forces"):
        FinetuneModel(demo(), HeadSpec("scalar")).init(jax.random.key(0), batch)


def test_block_lr_multipliers():
    assert optim.block_lr_multipliers(6) == optim.JMP_L_BLOCK_LR_MULTIPLIERS
    four = optim.block_lr_multipliers(4)
    assert len(four) == 4 and four[0] == 0.55 and four[-1] == 0.625
    assert min(four) < 0.45  # keeps the dip in the middle of the stack


def test_layerwise_lr_reaches_the_right_parameter_groups(batch):
    """JMP's groups: embedding 0.3; blocks_i = int_blocks_i + out_blocks_{i+1} (+ out_blocks_0 for i=0); rest 1."""
    spec = HeadSpec("scalar")
    config = backbone_for(demo(), spec)
    shapes = jax.eval_shape(lambda: FinetuneModel(config, spec).init(jax.random.key(0), batch))["params"]
    labels = optim.param_groups(shapes)
    assert {k: labels["backbone"][k] for k in ("int_blocks_0", "int_blocks_1", "out_blocks_0", "out_blocks_1",
                                                "out_blocks_2")} == {
        "int_blocks_0": jax.tree.map(lambda _: "blocks_0", shapes["backbone"]["int_blocks_0"]),
        "int_blocks_1": jax.tree.map(lambda _: "blocks_1", shapes["backbone"]["int_blocks_1"]),
        "out_blocks_0": jax.tree.map(lambda _: "blocks_0", shapes["backbone"]["out_blocks_0"]),
        "out_blocks_1": jax.tree.map(lambda _: "blocks_0", shapes["backbone"]["out_blocks_1"]),
        "out_blocks_2": jax.tree.map(lambda _: "blocks_1", shapes["backbone"]["out_blocks_2"]),
    }
    assert set(jax.tree.leaves(labels["embedding"])) == {"embedding"}
    for rest in (labels["backbone"]["bases"], labels["backbone"]["out_mlp_E"], labels["head"]):
        assert set(jax.tree.leaves(rest)) == {"rest"}

    config_o = optim.OptimConfig(lr=1e-3, block_multipliers=(0.5, 0.25), warmup_steps=4, total_steps=10,
                                 weight_decay=0.0)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    tx, schedules = optim.finetune_optimizer(params, config_o, num_blocks=2)
    # Adam's first update of a constant gradient is -lr (per element), whatever the gradient scaling. Jitted:
    # op by op, the update of every leaf would compile its own small programs.
    updates, _ = jax.jit(lambda p: tx.update(jax.tree.map(lambda x: jnp.full_like(x, 3.0), p), tx.init(p), p))(params)
    expected_lr = {"embedding": 0.3e-4, "blocks_0": 0.5e-4, "blocks_1": 0.25e-4, "rest": 1e-4}  # 0.1 x peak
    for label, update in zip(jax.tree.leaves(labels), jax.tree.leaves(updates)):
        np.testing.assert_allclose(update, -expected_lr[label], rtol=1e-5)
        np.testing.assert_allclose(schedules[label](0), expected_lr[label], rtol=1e-6)
    # After the cosine phase every group sits at (about) min_lr_factor x lr and stays there.
    for label, multiplier in optim.group_multipliers(config_o, 2).items():
        end = float(np.clip(0.1 / multiplier, 0.01, 0.99)) * 1e-3 * multiplier
        np.testing.assert_allclose([schedules[label](10), schedules[label](1000)], [end, end], rtol=1e-5)


def test_plateau_reduces_after_patience_like_torch():
    plateau = optim.PlateauScale(factor=0.8, patience=2, mode="min")
    scales = [plateau.update(v) for v in (1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5)]
    np.testing.assert_allclose(scales, [1, 1, 1, 0.8, 0.8, 0.8, 0.8, 0.64], rtol=1e-6)
    rising = optim.PlateauScale(factor=0.5, patience=0, mode="max")
    assert [rising.update(v) for v in (0.1, 0.2, 0.2)] == [1.0, 1.0, 0.5]


def test_metric_tracker_min_delta_and_mode():
    tracker = optim.MetricTracker("min", min_delta=0.1)
    assert [tracker.update(v) for v in (1.0, 0.95, 0.8, 0.85)] == [True, False, True, False]
    assert tracker.best == 0.8 and tracker.epochs_since_best == 1
    best_max = optim.MetricTracker("max")
    assert [best_max.update(v) for v in (0.5, 0.7, 0.6)] == [True, True, False]
