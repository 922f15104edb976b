"""load_pretrained / PretrainedModel on a randomly initialised narrow model written through orbax_io.

The model is `config.demo()` with random weights drawn in numpy (a Flax `init` would compile the whole
network once more); shapes come from `variable_shapes`. Compiles are the slow part, so the fixtures share
one model and each test reuses shapes where it can.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule

import jmp_jax
from jmp_jax.checkpoint import orbax_io
from jmp_jax.graph import batching, slots
from jmp_jax.graph.build import build_from_atoms
from jmp_jax.graph.validate import GraphInputError
from jmp_jax.models.config import demo
from jmp_jax.models.jmp import variable_shapes
from jmp_jax.graph.batching import bucketed_budgets
from jmp_jax.graph.batching import bucket_size
from jmp_jax.pretrained import PretrainedInputError, build_graphs, default_settings

# Two heads with distinct normalisations; the second has a linear reference (eV per element, by Z).
TASKS = [
    {"name": "molecules", "energy_std": 2.5, "force_std": 0.75, "cutoff": 8.0, "max_neighbors": 30,
     "linear_reference": None},
    {"name": "catalysis", "energy_std": 20.0, "force_std": 0.3, "cutoff": 12.0, "max_neighbors": 30,
     "linear_reference": {"1": -0.5, "6": -1.25, "8": -2.0, "29": -3.5}},
]


def random_variables(config, num_tasks: int, seed: int = 0) -> dict:
    """{"params", "constants"} of JMPModel with numpy N(0, 1/fan_in) weights, N(0, 1) embeddings, small biases."""
    rng = np.random.default_rng(seed)

    def draw(path, spec):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale_factor":
            return np.full(spec.shape, 0.2, np.float32)  # < 1 keeps sums over many neighbours moderate
        if name == "embedding":
            return rng.normal(size=spec.shape).astype(np.float32)
        if name == "bias":
            return rng.normal(scale=0.1, size=spec.shape).astype(np.float32)
        fan_in = int(np.prod(spec.shape[:-1]))
        return rng.normal(scale=fan_in ** -0.5, size=spec.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, variable_shapes(config, num_tasks))


def write_random_checkpoint(directory, tasks=TASKS, seed: int = 0) -> str:
    """A converter-style orbax directory (params, constants, metadata with tasks) of a random demo model."""
    config = demo()
    metadata = dict(orbax_io.make_metadata(config, len(tasks), "random init (test)", ema=False), tasks=tasks)
    orbax_io.save_variables(directory, random_variables(config, len(tasks), seed), metadata)
    return str(directory)


def ethanol() -> Atoms:
    return molecule("CH3CH2OH")


def copper_slab() -> Atoms:
    slab = fcc111("Cu", (2, 2, 2), vacuum=6.0)
    add_adsorbate(slab, "O", 1.5, "fcc")
    slab.set_tags(np.full(len(slab), 2))  # ase numbers layers in tags; use JMP's non-OC20 default
    return slab


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("jmp_random") / "ckpt")


@pytest.fixture(scope="module")
def model(checkpoint):
    return jmp_jax.load_pretrained(checkpoint)


@pytest.fixture(scope="module")
def pair_prediction(model):
    return model.predict([ethanol(), copper_slab()], head="catalysis")


def test_loads_config_tasks_and_weights(model, checkpoint):
    assert model.config == demo()
    assert model.task_names == ["molecules", "catalysis"]
    assert model.tasks[1].reference_energy(np.array([1, 8, 29])) == pytest.approx(-6.0)
    stored, _ = orbax_io.load_variables(checkpoint)
    emb = model.variables["params"]["embedding"]["atom_embedding"]["embedding"]
    np.testing.assert_array_equal(emb, stored["params"]["embedding"]["atom_embedding"]["embedding"])


def test_predict_shapes_units_and_direct_apply(model, pair_prediction):
    """predict = JMPModel.apply on a tightly padded batch, times the head's stds, plus the linear reference."""
    mol, slab = ethanol(), copper_slab()
    assert pair_prediction["energy"].shape == (2,)
    assert [f.shape for f in pair_prediction["forces"]] == [(len(mol), 3), (len(slab), 3)]

    graphs = build_graphs([mol, slab])
    assert graphs[0].pbc.tolist() == [False] * 3 and graphs[1].pbc.tolist() == [True] * 3
    batch = batching.collate(graphs, batching.budgets_for(graphs))
    out = jax.jit(lambda v, b: model.module.apply(v, b, task=1))(model.variables, batch)
    task = model.tasks[1]
    reference = np.array([task.reference_energy(g.atomic_numbers) for g in graphs])
    np.testing.assert_allclose(pair_prediction["energy"],
                               np.asarray(out["energy"][:2]) * task.energy_std + reference, rtol=1e-5, atol=1e-4)
    forces = np.asarray(out["forces"]) * task.force_std
    np.testing.assert_allclose(np.concatenate(pair_prediction["forces"]), forces[:len(mol) + len(slab)],
                               rtol=1e-4, atol=1e-5 * np.abs(forces).max())
    assert np.all(np.isfinite(pair_prediction["energy"])) and np.abs(forces).max() > 0


def test_graph_settings_follow_periodicity_and_overrides():
    mol_graph, slab_graph = build_graphs([ethanol(), copper_slab()])
    assert mol_graph.a2a.distance.max() <= 8.0 and slab_graph.a2a.distance.max() > 8.0
    assert slab_graph.a2a.distance.max() <= 12.0
    (short,) = build_graphs([copper_slab()], cutoff=6.0, max_neighbors=12)
    assert short.a2a.distance.max() <= 6.0
    # The perfect slab's shells tie: the cap of 12 keeps whole shells (the default "invariant" policy).
    assert np.bincount(short.main_knn.receivers).min() >= 12
    (strict,) = [build_from_atoms(copper_slab(), dataclasses.replace(default_settings(copper_slab(), 6.0, 12, None),
                                                                     neighbor_policy="reference"))]
    assert np.bincount(strict.main_knn.receivers).max() == 12
    (open_slab,) = build_graphs([copper_slab()], pbc=False)
    assert not open_slab.pbc.any()


def test_batching_invariance_and_compile_reuse(model, pair_prediction):
    mol_alone = model.predict([ethanol()], head=1)
    slab_alone = model.predict(copper_slab(), head=1)  # a bare Atoms is one structure
    np.testing.assert_allclose(pair_prediction["energy"],
                               [mol_alone["energy"][0], slab_alone["energy"][0]], rtol=1e-5, atol=1e-4)
    for together, alone in zip(pair_prediction["forces"], [mol_alone["forces"][0], slab_alone["forces"][0]]):
        np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5 * np.abs(alone).max())
    # Another 9-atom molecule, and a displaced ethanol, fall in the same buckets: no new compile.
    compiles = model.num_compiles
    ether = molecule("CH3OCH3")
    moved = ethanol()
    moved.rattle(0.05, seed=1)
    model.predict([ether], head=1)
    model.predict([moved], head=1)
    # batch_size=1 runs the pair as the two single-structure batches above.
    chunked = model.predict([ethanol(), copper_slab()], head=1, batch_size=1)
    np.testing.assert_array_equal(chunked["energy"], [mol_alone["energy"][0], slab_alone["energy"][0]])
    assert model.num_compiles == compiles


def test_moved_structures_reuse_the_widest_slot_layout(checkpoint):
    """MD-like calls on one slab: a frame whose largest a2a in-degree rounds to a narrower slot width than an
    earlier frame's reuses the earlier, wider layout (no new compile) and predicts what it predicts alone; a
    wider frame grows the layout once (`padded_batches`)."""
    def frame(seed):
        slab = copper_slab()
        slab.rattle(0.05, seed=seed)
        return slab

    wide, narrow = frame(0), frame(10)
    own = [slots.widths_of(batching.collate(g, bucketed_budgets(g))) for g in map(build_graphs, ([wide], [narrow]))]
    assert own[0]["a2a"] > own[1]["a2a"]  # the frames' own layouts differ
    model = jmp_jax.load_pretrained(checkpoint)
    model.predict([wide], head="catalysis")
    compiles = model.num_compiles
    after_wide = model.predict([narrow], head="catalysis")
    assert model.num_compiles == compiles

    alone = jmp_jax.load_pretrained(checkpoint)
    first = alone.predict([narrow], head="catalysis")
    alone.predict([wide], head="catalysis")  # grows the layout: one more compile
    again = alone.predict([narrow], head="catalysis")
    assert alone.num_compiles == 2
    for got in (after_wide, again):
        np.testing.assert_allclose(got["energy"], first["energy"], rtol=1e-5)
        np.testing.assert_allclose(got["forces"][0], first["forces"][0], rtol=1e-4,
                                   atol=1e-5 * np.abs(first["forces"][0]).max())


def test_bucketed_budgets_bound_padding():
    assert [bucket_size(n) for n in (1, 8, 9, 12, 13, 17, 100)] == [8, 8, 12, 12, 16, 24, 128]
    assert all(n <= bucket_size(n) <= 1.5 * n for n in range(8, 5000))
    graphs = build_graphs([ethanol(), ethanol()])
    budgets = bucketed_budgets(graphs)
    need = sum((batching.structure_sizes(g) for g in graphs), batching.Budgets.zeros())
    assert need.fits_in(budgets) and budgets.graphs == 3


def test_embed_layers(model):
    mol, slab = ethanol(), copper_slab()
    layers = model.embed([mol, slab])
    keys = ["h_embedding"] + [f"h_block{k}" for k in range(demo().num_blocks)] + ["energy_features"]
    assert len(layers) == 2
    for atoms, structure in zip((mol, slab), layers):
        assert list(structure) == keys == model.embedding_keys
        assert all(v.shape == (len(atoms), demo().emb_size_atom) for v in structure.values())
        assert all(np.all(np.isfinite(v)) for v in structure.values())
        table = np.asarray(model.variables["params"]["embedding"]["atom_embedding"]["embedding"])
        np.testing.assert_array_equal(structure["h_embedding"], table[atoms.get_atomic_numbers() - 1])
    # Blocks change the embedding of an atom depending on its environment: the two C atoms differ.
    carbons = np.flatnonzero(mol.get_atomic_numbers() == 6)
    assert not np.allclose(layers[0]["h_block0"][carbons[0]], layers[0]["h_block0"][carbons[1]])


def test_bad_inputs(model):
    with pytest.raises(PretrainedInputError, match=r"unknown head 5; available heads: 0='molecules', 1='catalysis'"):
        model.predict([ethanol()], head=5)
    with pytest.raises(PretrainedInputError, match="unknown head 'oc20'"):
        model.predict([ethanol()], head="oc20")
    with pytest.raises(PretrainedInputError, match="atoms_list is empty"):
        model.predict([])
    with pytest.raises(PretrainedInputError, match=r"atoms_list\[1\] is a str"):
        model.predict([ethanol(), "H2O"])
    broken = ethanol()
    broken.positions[3, 1] = np.nan
    with pytest.raises(GraphInputError, match=r"atoms_list\[1\].*non-finite position .* atom 3"):
        model.predict([ethanol(), broken])
    with pytest.raises(PretrainedInputError, match="forces must be one of"):
        model.predict([ethanol()], forces="analytic")


def test_checkpoint_without_tasks_needs_them(tmp_path):
    config = demo()
    orbax_io.save_variables(tmp_path / "bare", random_variables(config, 2),
                            orbax_io.make_metadata(config, 2, "random init (test)", ema=False))
    with pytest.raises(PretrainedInputError, match="describes no tasks"):
        jmp_jax.load_pretrained(tmp_path / "bare")
    loaded = jmp_jax.load_pretrained(tmp_path / "bare", tasks=[{"name": "a", "energy_std": 1.0, "force_std": 1.0},
                                                             {"name": "b", "energy_std": 3.0, "force_std": 2.0}])
    assert loaded.task_names == ["a", "b"] and loaded.tasks[1].energy_std == 3.0
    with pytest.raises(PretrainedInputError, match="float64 needs jax x64"):
        jmp_jax.load_pretrained(tmp_path / "bare", tasks=TASKS, dtype=jnp.float64)


def test_converted_jmp_checkpoint_gets_jmp_tasks(tmp_path):
    """A converter output of JMP's 4-head model has no task metadata: JMP's pre-training tasks apply."""
    config = demo()
    orbax_io.save_variables(tmp_path / "jmp", random_variables(config, 4),
                            orbax_io.make_metadata(config, 4, "jmp-s.pt (test)", ema=True))
    loaded = jmp_jax.load_pretrained(tmp_path / "jmp")
    assert loaded.task_names == ["oc20", "oc22", "ani1x", "transition1x"]
    assert loaded.tasks[0].energy_std == pytest.approx(24.901469505465872)
    assert loaded.tasks[2].force_std == pytest.approx(2.131422996520996)
    assert loaded.head_index("transition1x") == 3


def test_training_checkpoint_layout_and_ema(tmp_path):
    """A training run dir (`<workdir>/checkpoints/<step>/`) loads EMA or raw weights."""
    import orbax.checkpoint as ocp

    config = demo()
    raw, ema = random_variables(config, 2, seed=1), random_variables(config, 2, seed=2)
    metadata = {**orbax_io.make_metadata(config, 2, "pretrain", ema=True), "tasks": TASKS}
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "run" / "checkpoints", options=options) as manager:
        manager.save(7, args=ocp.args.Composite(**orbax_io.save_args(raw, metadata, ema_params=ema["params"])))
        manager.wait_until_finished()

    def embedding(loaded):
        return np.asarray(loaded.variables["params"]["embedding"]["atom_embedding"]["embedding"])

    with_ema = jmp_jax.load_pretrained(tmp_path / "run")
    assert with_ema.config == config and with_ema.task_names == ["molecules", "catalysis"]
    np.testing.assert_array_equal(embedding(with_ema), ema["params"]["embedding"]["atom_embedding"]["embedding"])
    without = jmp_jax.load_pretrained(tmp_path / "run" / "checkpoints" / "7", ema=False)
    np.testing.assert_array_equal(embedding(without), raw["params"]["embedding"]["atom_embedding"]["embedding"])
