"""Fine-tuning configs, one training step per head kind, checkpoint loading (EMA / raw), tiny full runs and their
checkpoints in `load_pretrained` and the ASE calculator."""
import dataclasses
import functools
import importlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from ase import units
from ase.build import bulk, molecule
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from configs.finetune import common
import jmp_jax
from data_prep import shard_writer
from experiments import evaluate
from jmp_jax.ase_calculator import JMPCalculator
from jmp_jax.data import records
from jmp_jax.checkpoint import integrity, orbax_io
from jmp_jax.finetune import loop, optim, weights
from jmp_jax.finetune.data import DataSpec, SplitData
from jmp_jax.finetune.model import FinetuneModel, backbone_for
from jmp_jax.training.state import init_train_state, init_variables
from jmp_jax.models.config import NAMED_CONFIGS, demo
from jmp_jax.models.jmp import JMPModel, placeholder_batch
from jmp_jax.pretrained import PretrainedInputError

QM9_TARGETS = tuple(common.QM9_NORMALIZATION)


def _variant(dataset: str, key: str, size: str) -> str:
    return size if dataset == "qmof" else f"{key},{size}"


def all_configs(size: str):
    for dataset, keys in common.TASK_KEYS.items():
        for key in keys:
            yield dataset, key, common.get_config(dataset, _variant(dataset, key, size))


def test_every_config_builds_for_both_sizes():
    count = 0
    for size in ("jmp_s", "jmp_l"):
        backbone_size = NAMED_CONFIGS[size]()
        for dataset, key, c in all_configs(size):
            module = importlib.import_module(f"configs.finetune.{dataset}")
            assert module.get_config(_variant(dataset, key, size)).to_dict() == c.to_dict()
            spec = loop.head_spec(c.task)
            backbone = backbone_for(backbone_size, spec)
            groups = optim.group_multipliers(loop.optim_config(c, backbone.num_blocks, 10), backbone.num_blocks)
            assert len(groups) == backbone.num_blocks + 2 and groups["embedding"] == 0.3
            assert c.model.backbone == size and c.data.batch_size >= 1
            count += 1
    assert count == 2 * (12 + 10 + 7 + 2 + 9 + 1)
    c = common.get_config("qm9", "R_2_Abs,jmp_s")
    assert c.task.head == "spatial_extent" and not c.task.normalize and c.task.cutoff == 8.0
    c = common.get_config("rmd17", "ethanol")
    assert (c.task.cutoff, c.task.max_neighbors, c.optim.plateau_patience, c.model.backbone) == (7.0, 100, 10, "jmp_l")
    assert not common.get_config("md22", "Ac-Ala3-NHMe").task.gradient_forces
    assert common.get_config("md22", "DHA").task.gradient_forces
    c = common.get_config("matbench", "mp_is_metal,fold2")
    assert c.task.kind == "classification" and c.task.source == "matbench_mp_is_metal_fold2"
    assert common.get_config("matbench", "phonons,fold4").task.target_mean == common.MATBENCH_NORMALIZATION[
        "phonons"][4][0]
    assert common.get_config("qmof", "").task.cutoff == 19.0
    for dataset, variant in (("qm9", "jmp_s"), ("rmd17", "water"), ("matbench", "mp_gap,fold7"), ("qm9", "U,fold1")):
        with pytest.raises(ValueError):
            common.get_config(dataset, variant)


def molecule_records(n: int, seed: int, periodic: bool = False):
    rng = np.random.default_rng(seed)
    for i in range(n):
        atoms = bulk("NaCl", "rocksalt", a=5.6) if periodic else molecule(("CH3OH", "H2O", "NH3")[i % 3])
        atoms.rattle(0.05, seed=seed * 100 + i)
        names = QM9_TARGETS + tuple(t for t, _, _ in common.MATBENCH.values()) + ("bandgap",)
        targets = {**{t: float(rng.normal()) for t in names}, "is_metal": float(i % 2)}
        yield records.make_record(atoms.numbers, atoms.positions, cell=atoms.cell[:] if periodic else None,
                                  pbc=periodic, energy=float(rng.normal()), forces=rng.normal(size=(len(atoms), 3)),
                                  targets=targets, source_id=f"{seed}-{i}")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("finetune_data"))
    for split, n, seed in (("train", 5, 1), ("val", 3, 2), ("test", 3, 3)):
        shard_writer.write_split(molecule_records(n, seed), out, "tiny", split, units={}, source_files=[])
    shard_writer.write_split(molecule_records(3, 4, periodic=True), out, "tiny_crystal", "train", units={},
                        source_files=[])
    return out


def test_crystal_batches_with_conditional_neighbour_caps(data_dir):
    spec = DataSpec("tiny_crystal", cutoff=6.0, max_neighbors=30, pbc=True, batch_size=2, target="is_metal",
                    conditional_max_neighbors=True)
    assert [spec.settings(n).max_neighbors for n in (10, 201, 301)] == [30, 10, 5]
    split = SplitData(data_dir, spec, "train")
    batches = list(split.batches(split.order(0, 0)))
    masks = [np.asarray(b.graphs.graph.globals["mask"]) for b in batches]
    assert sum(int(m.sum()) for m in masks) == 3 and max(int(m.sum()) for m in masks) <= 2
    targets = np.concatenate([np.asarray(b.targets)[m] for b, m in zip(batches, masks)])
    assert sorted(targets.tolist()) == [0.0, 0.0, 1.0]
    assert all(np.asarray(b.graphs.graph.edges["shift"]).any() for b in batches)  # periodic images


def _distinct_demo_heads():
    """One demo config per distinct head (the compiled step depends on the head only)."""
    chosen = {}
    for dataset, key, c in all_configs("demo"):
        chosen.setdefault(loop.head_spec(c.task), c)
    return list(chosen.values())


def test_each_finetune_head_takes_a_training_step(data_dir):
    configs = _distinct_demo_heads()
    assert {(c.task.kind, c.task.head, c.task.reduction, c.task.gradient_forces) for c in configs} >= {
        ("scalar", "mlp", "sum", True), ("scalar", "spatial_extent", "sum", True), ("forces", "mlp", "sum", True),
        ("forces", "mlp", "sum", False), ("scalar", "mlp", "mean", True), ("scalar", "mlp", "max", True),
        ("classification", "mlp", "sum", True)}  # mp_is_metal: JMP's classification default
    for c in configs:
        spec = loop.head_spec(c.task)
        # One molecule batch for every head: new shapes would cost new (eager) compiles.
        dspec = DataSpec(source="tiny", cutoff=5.0, max_neighbors=12, pbc=False, batch_size=2,
                         target=None if spec.kind == "forces" else c.task.target)
        split = SplitData(data_dir, dspec, "train")
        batch, real, _ = next(split.steps(split.order(0, 0), num_shards=1))
        # One interaction block: eager time grows with the op count, and every head sees the same backbone.
        model = FinetuneModel(dataclasses.replace(backbone_for(demo(), spec), num_blocks=1), spec)
        variables = init_variables(model, 0, "none", "demo")
        tx, _ = optim.finetune_optimizer(variables["params"], loop.optim_config(c, 1, 3), 1)
        state = init_train_state(variables, tx, ema=False)
        norm = loop.loss_lib.Normalization(force_std=1.0, coefficient=c.task.loss_coefficient,
                                           class_weights=tuple(c.task.class_weights) or None)
        step = jax.jit(functools.partial(loop.train_step, model=model, tx=tx, norm=norm))
        new, metrics = step(state, batch, real, jax.random.key(1), jnp.float32(1.0))
        assert bool(metrics["finite"]) and int(new.step) == 1, c.task.name
        moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params, state.params)
        head = next(name for name in ("head", "force_head", "energy_head") if name in moved)
        assert all(jax.tree.leaves(moved[head])), c.task.name
        assert any(jax.tree.leaves(moved["backbone"])), c.task.name


@pytest.fixture(scope="module")
def pretrain_checkpoint(tmp_path_factory):
    """A demo pre-training checkpoint with raw params, EMA params = 0.9 raw and non-unit scale factors."""
    variables = JMPModel(demo(), num_tasks=2).init(jax.random.key(3), placeholder_batch())
    # Small, distinct perturbations: the weights must still give finite outputs.
    variables = {"params": variables["params"], "constants": jax.tree.map(lambda a: a * 1.1, variables["constants"])}
    ema = jax.tree.map(lambda a: a * 0.9, variables["params"])
    path = str(tmp_path_factory.mktemp("pretrain") / "checkpoints")
    with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=True)) as manager:
        meta = orbax_io.make_metadata(demo(), 2, "pretrain", ema=True)
        manager.save(7, args=ocp.args.Composite(**orbax_io.save_args(variables, meta, ema_params=ema)))
        manager.wait_until_finished()
    return path, variables, ema


@pytest.mark.parametrize("use_ema", [True, False])
def test_checkpoint_loading_with_and_without_ema(pretrain_checkpoint, use_ema):
    path, raw, ema = pretrain_checkpoint
    spec = loop.head_spec(common.get_config("qm9", "U_0,demo").task)
    model = FinetuneModel(backbone_for(demo(), spec), spec)
    target = init_variables(model, 0, "none", "demo")
    loaded, info = weights.load_initial_variables(target, os.path.dirname(path), model.config, use_ema=use_ema)
    source = ema if use_ema else raw["params"]
    np.testing.assert_array_equal(loaded["params"]["embedding"]["atom_embedding"]["embedding"],
                                  source["embedding"]["atom_embedding"]["embedding"])
    np.testing.assert_array_equal(loaded["params"]["backbone"]["int_blocks_1"]["dense_ca"]["kernel"],
                                  source["backbone"]["int_blocks_1"]["dense_ca"]["kernel"])
    np.testing.assert_array_equal(loaded["params"]["head"]["mlp"]["linear_0"]["kernel"],
                                  target["params"]["head"]["mlp"]["linear_0"]["kernel"])
    assert jax.tree.structure(loaded) == jax.tree.structure(target)
    scale = loaded["constants"]["backbone"]["out_blocks_0"]["scale_sum"]["scale_factor"]
    np.testing.assert_array_equal(scale, raw["constants"]["backbone"]["out_blocks_0"]["scale_sum"]["scale_factor"])
    assert info["ema"] == use_ema
    assert any(d.startswith("params/output/") for d in info["dropped"])
    assert any("out_mlp_F" in d for d in info["dropped"]) and any("scale_rbf_F" in d for d in info["dropped"])


def test_checkpoint_loading_rejects_another_backbone(pretrain_checkpoint):
    path, _, _ = pretrain_checkpoint
    spec = loop.head_spec(common.get_config("qm9", "U_0,demo").task)
    other = dataclasses.replace(backbone_for(demo(), spec), emb_size_rbf=4)
    model = FinetuneModel(other, spec)
    target = jax.eval_shape(lambda: model.init(jax.random.key(0), placeholder_batch()))
    with pytest.raises(weights.InitCheckpointError, match="emb_size_rbf"):
        weights.load_initial_variables(target, path, other)


@pytest.fixture(scope="module")
def qm9_run(data_dir, pretrain_checkpoint, tmp_path_factory):
    """A tiny QM9 U_0 fine-tuning run (2 epochs) from the demo pre-training checkpoint: (workdir, result)."""
    path, _, _ = pretrain_checkpoint
    c = common.get_config("qm9", "U_0,demo")
    c.data.dir = data_dir
    c.task.source, c.task.cutoff, c.task.max_neighbors = "tiny", 5.0, 12
    c.data.batch_size = 2
    c.train.max_epochs = 2
    workdir = tmp_path_factory.mktemp("qm9_run")
    return workdir, loop.run(c, str(workdir), init=path)


@pytest.fixture(scope="module")
def rmd17_run(data_dir, tmp_path_factory):
    """A tiny rMD17-recipe run (gradient forces, force loss) of a 1-block demo backbone from scratch, one epoch:
    (workdir, result). One block halves the compile of the second-order training step."""
    workdir = tmp_path_factory.mktemp("rmd17_run")
    backbone = workdir / "backbone.json"
    backbone.write_text(json.dumps(dataclasses.replace(demo(), num_blocks=1).to_dict()))
    c = common.get_config("rmd17", "ethanol,demo")
    c.model.backbone = str(backbone)
    c.data.dir = data_dir
    c.task.source, c.task.cutoff, c.task.max_neighbors = "tiny", 5.0, 12
    c.data.batch_size = 2
    c.train.max_epochs = 1
    return workdir, loop.run(c, str(workdir), init="scratch")


def test_tiny_finetune_run_from_checkpoint(qm9_run, pretrain_checkpoint):
    workdir, result = qm9_run
    path, _, _ = pretrain_checkpoint
    assert result["init"] == os.path.abspath(path) and result["epochs"] == 2
    assert np.isfinite(result["test"]["mae"]) and result["primary_metric"] == "mae"
    with open(workdir / "results.json") as f:
        assert json.load(f)["test"] == result["test"]
    assert integrity.verify(result["best_checkpoint"])  # checksummed once written
    best, meta = orbax_io.load_variables(result["best_checkpoint"], use_ema=False)
    assert "head" in best["params"] and meta["finetune"]["task"]["target"] == "U_0"
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "val/mae" in json.loads(lines[0])


def split_atoms(data_dir: str, split: str):
    """(records, ase.Atoms) of a prepared split of the tiny source."""
    records = evaluate.read_records(data_dir, "tiny", split)
    return records, [evaluate.record_to_atoms(r) for r in records]


def test_finetuned_scalar_checkpoint_predicts_what_its_evaluation_scored(data_dir, qm9_run):
    workdir, result = qm9_run
    model = jmp_jax.load_pretrained(workdir)  # the run's workdir: its best checkpoint
    assert isinstance(model, jmp_jax.FinetunedModel) and model.path == str(workdir / "best")
    assert model.task_names == ["qm9_U_0"] and model.target == "U_0" and "head" in model.variables["params"]
    records, atoms = split_atoms(data_dir, "test")
    predicted = model.predict(atoms, head="qm9_U_0")
    assert set(predicted) == {"U_0"} and predicted["U_0"].shape == (len(atoms),)
    labels = np.array([r["targets"]["U_0"] for r in records])
    # The test metric of the run (best weights, the split's budgets) from this checkpoint's predictions.
    assert np.mean(np.abs(predicted["U_0"] - labels)) == pytest.approx(result["test"]["mae"], rel=1e-5)

    def one_line_error(call, pattern):
        with pytest.raises(PretrainedInputError, match=pattern) as caught:
            call()
        assert "\n" not in str(caught.value)

    where = re.escape(f"{workdir / 'best'} (task 'qm9_U_0', a scalar head)")
    one_line_error(lambda: JMPCalculator(model), f"^{where} predicts no forces \\(metadata key finetune.task.kind\\)$")
    one_line_error(lambda: JMPCalculator(str(workdir), forces="gradient"), f"^{where} predicts no forces")
    one_line_error(lambda: model.predict(atoms, head="oc20"), f"^unknown head 'oc20'; {where} has one head")
    one_line_error(lambda: jmp_jax.load_pretrained(workdir, tasks=[{"name": "x", "energy_std": 1, "force_std": 1}]),
                   "best: tasks= is for pre-trained checkpoints; this one is fine-tuned")


def test_finetuned_force_checkpoint_backs_predict_and_an_md_step(data_dir, rmd17_run):
    workdir, result = rmd17_run
    model = jmp_jax.load_pretrained(result["best_checkpoint"])  # a step directory of best/
    assert model.force_mode(None) == "gradient" and model.gives_energy and model.num_compiles == 0
    records, atoms = split_atoms(data_dir, "test")
    predicted = model.predict(atoms)
    assert set(predicted) == {"energy", "forces"} and predicted["energy"].shape == (len(atoms),)
    error = np.concatenate(predicted["forces"]) - np.concatenate([r["forces"] for r in records])
    assert np.mean(np.abs(error)) == pytest.approx(result["test"]["force_mae"], rel=1e-5)

    # The energy is the one the forces derive from (eV, same scale): a small step along F lowers it by ~|F|·step.
    moved = atoms[0].copy()
    direction = predicted["forces"][0] / np.linalg.norm(predicted["forces"][0])
    moved.positions += 1e-3 * direction
    change = model.predict([moved])["energy"][0] - predicted["energy"][0]
    assert change == pytest.approx(-1e-3 * np.linalg.norm(predicted["forces"][0]), rel=0.05)

    # The calculator from the workdir path, in a velocity-Verlet MD step.
    md_atoms = atoms[0].copy()
    md_atoms.calc = JMPCalculator(str(workdir))
    thermalize_momenta(md_atoms, 300, rng=np.random.default_rng(0))
    start = md_atoms.positions.copy()
    VelocityVerlet(md_atoms, timestep=0.5 * units.fs).run(2)
    assert np.isfinite(md_atoms.get_total_energy()) and np.abs(md_atoms.positions - start).max() > 1e-4
    expected = model.predict([md_atoms])
    np.testing.assert_allclose(md_atoms.get_forces(), expected["forces"][0], rtol=1e-5, atol=1e-6)
    assert md_atoms.get_potential_energy() == pytest.approx(expected["energy"][0], rel=1e-6)

    with pytest.raises(PretrainedInputError, match=r"was fine-tuned with gradient forces \(metadata key "
                                                   r"finetune.task.gradient_forces\); forces='direct' does not apply"):
        JMPCalculator(model, forces="direct")
    with pytest.raises(PretrainedInputError, match="cutoff cannot be overridden"):
        JMPCalculator(model, cutoff=6.0)


def test_checkpoint_from_another_config_is_refused(qm9_run, rmd17_run, tmp_path):
    """The rMD17 run's weights under the QM9 run's metadata: one line naming the file and the first leaves."""
    variables, _ = orbax_io.load_variables(rmd17_run[1]["best_checkpoint"], use_ema=False)
    metadata = orbax_io.read_metadata(qm9_run[1]["best_checkpoint"])
    orbax_io.save_variables(tmp_path / "mixed", variables, metadata)
    with pytest.raises(PretrainedInputError) as caught:
        jmp_jax.load_pretrained(tmp_path / "mixed")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'mixed'}: weights do not match the model of its metadata (keys 'config', "
                              "'finetune.task'): checkpoint from another config") and "\n" not in message
    assert "missing head/mlp/linear_0/kernel" in message and "unexpected energy_head" in message
