"""Metric functions against hand-computed values, and `experiments.evaluate` end to end on a tiny split.

The checkpoints are the random demo model of test_pretrained and random demo fine-tuning models (classifier,
scalar head); the split (3 molecules and a Cu slab with fixed atoms, random labels) is written with
data_prep.shard_writer.write_split.
"""
from __future__ import annotations

import json

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest
from ase.build import add_adsorbate, fcc111, molecule

import jmp_jax
from configs.finetune.common import base_task
from data_prep import shard_writer
from jmp_jax.data import records as records_lib
from experiments import evaluate
from jmp_jax import evaluation
from jmp_jax.checkpoint import orbax_io
from jmp_jax.evaluation import EvaluationInputError
from jmp_jax.finetune import data as finetune_data, loop, model as finetune_model
from jmp_jax.finetune.loss import Normalization
from jmp_jax.graph import batching
from jmp_jax.models.config import BackboneConfig, demo
from jmp_jax.graph.batching import bucketed_budgets
from test_pretrained import write_random_checkpoint

SOURCE, SPLIT = "catalysis", "test"  # "catalysis" is a head name of the random checkpoint


def test_regression_metrics_by_hand():
    # errors 0, -1, 3: MAE 4/3, RMSE sqrt(10/3)
    result = evaluation.regression_metrics([1.0, 2.0, 4.0], [1.0, 3.0, 1.0])
    assert result == pytest.approx({"mae": 4 / 3, "rmse": np.sqrt(10 / 3), "count": 3})
    with pytest.raises(EvaluationInputError, match=r"energy: predicted shape \(2,\) != true shape \(3,\)"):
        evaluation.regression_metrics([1.0, 2.0], [1.0, 2.0, 3.0], "energy")
    with pytest.raises(EvaluationInputError, match="true values contain NaN"):
        evaluation.regression_metrics([1.0, 2.0], [1.0, np.nan])
    with pytest.raises(EvaluationInputError, match="no values"):
        evaluation.regression_metrics([], [])


def test_force_metrics_by_hand_with_mask():
    true = [np.zeros((2, 3)), np.zeros((1, 3))]
    predicted = [np.array([[3.0, 4.0, 0.0], [100.0, 0.0, 0.0]]), np.array([[0.0, 0.0, -1.0]])]
    mask = [np.array([True, False]), np.array([True])]  # the 100 eV/Å atom is fixed: left out
    result = evaluation.force_metrics(predicted, true, mask)
    # components over 2 atoms: |3|, |4|, 0, 0, 0, |-1| -> MAE 8/6, RMSE sqrt(26/6); norms 5 and 1 -> l2_mae 3
    assert result == pytest.approx({"mae": 8 / 6, "rmse": np.sqrt(26 / 6), "l2_mae": 3.0, "count": 2})
    assert evaluation.force_metrics(predicted, true)["count"] == 3
    with pytest.raises(EvaluationInputError, match=r"forces of structure 1"):
        evaluation.force_metrics(predicted, [np.zeros((2, 3)), np.zeros((2, 3))])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_under_class_imbalance():
    from sklearn.metrics import balanced_accuracy_score

    # 9 negatives, 1 positive, always "0": accuracy 0.9 but balanced accuracy 0.5 (chance).
    true = np.array([0] * 9 + [1])
    assert evaluation.balanced_accuracy(np.zeros(10, int), true) == pytest.approx(0.5)
    # recall(0) = 4/4, recall(1) = 1/2 -> 0.75
    assert evaluation.balanced_accuracy([0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 1]) == pytest.approx(0.75)
    # three classes, recalls 1/2, 2/2, 1/2
    assert evaluation.balanced_accuracy([0, 1, 1, 1, 1, 2], [0, 0, 1, 1, 2, 2]) == pytest.approx((0.5 + 1 + 0.5) / 3)
    # recalls 1/2, 2/3, 0/1; class 3, only predicted, does not count
    predicted, labels = [0, 1, 1, 1, 2, 3], [0, 0, 1, 1, 1, 2]
    assert evaluation.balanced_accuracy(predicted, labels) == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert evaluation.balanced_accuracy(predicted, labels) == pytest.approx(balanced_accuracy_score(labels, predicted))
    with pytest.raises(EvaluationInputError, match="need equal, non-empty"):
        evaluation.balanced_accuracy([0, 1], [0, 1, 1])


def test_classification_and_compute_metrics():
    logits = np.array([[2.0, -1.0], [0.5, 0.1], [-1.0, 3.0], [0.2, 0.4]])  # argmax 0, 0, 1, 1
    result = evaluation.classification_metrics(logits, [0, 1, 1, 1])
    assert result == pytest.approx({"balanced_accuracy": (1 + 2 / 3) / 2, "accuracy": 0.75, "count": 4})
    with pytest.raises(EvaluationInputError, match=r"integers in 0..1"):
        evaluation.classification_metrics(logits, [0, 1, 2, 1])
    with pytest.raises(EvaluationInputError, match="4 rows of class logits for 3 labels"):
        evaluation.classification_metrics(logits, [0, 1, 1])

    truth = {"energy": np.array([-10.0, -20.0]), "natoms": np.array([2, 4]), "labels": np.array([0, 1]),
             "forces": [np.zeros((2, 3)), np.ones((4, 3))]}
    prediction = {"energy": np.array([-9.0, -22.0]), "logits": np.array([[1.0, 0.0], [1.0, 0.0]]),
                  "forces": [np.zeros((2, 3)), np.ones((4, 3))]}
    metrics = evaluation.compute_metrics(truth, prediction)
    assert set(metrics) == {"energy", "energy_per_atom", "forces", "classification"}
    assert metrics["energy"]["mae"] == pytest.approx(1.5)
    assert metrics["energy_per_atom"]["mae"] == pytest.approx((0.5 + 0.5) / 2)
    assert metrics["forces"]["mae"] == 0.0 and metrics["classification"]["balanced_accuracy"] == 0.5


def tiny_records() -> list[dict]:
    """3 molecules and an OC20-like Cu slab whose bottom layer is fixed, with random labels and a target."""
    rng = np.random.default_rng(3)
    structures = [molecule("CH3CH2OH"), molecule("H2O"), molecule("CH4")]
    slab = fcc111("Cu", (2, 2, 2), vacuum=6.0)
    add_adsorbate(slab, "O", 1.5, "fcc")
    structures.append(slab)
    records = []
    for i, atoms in enumerate(structures):
        n = len(atoms)
        fixed = atoms.positions[:, 2] < atoms.positions[:, 2].min() + 0.1 if atoms.pbc.any() else None
        records.append(records_lib.make_record(
            atoms.numbers, atoms.positions, source_id=f"tiny:{i}", cell=atoms.cell.array, pbc=atoms.pbc,
            fixed=fixed, energy=-5.0 * n + rng.normal(), forces=rng.normal(size=(n, 3)),
            targets={"gap": rng.uniform(1, 5), "is_metal": float(atoms.pbc.any() or i == 1)}))
    return records


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    checkpoint = write_random_checkpoint(root / "ckpt")
    records = tiny_records()
    shard_writer.write_split(records, str(root / "data"), SOURCE, SPLIT, units={"energy": "eV"}, source_files=[],
                            records_per_shard=3)
    return root, checkpoint, records


@pytest.fixture(scope="module")
def cli_run(setup):
    root, checkpoint, _ = setup
    output = root / "eval"
    summary = evaluate.main(["--checkpoint", checkpoint, "--data", str(root / "data"), "--source", SOURCE,
                             "--split", SPLIT, "--target", "gap", "--output", str(output)])
    return output, summary


def test_cli_metrics_equal_direct_predict(setup, cli_run):
    root, checkpoint, records = setup
    output, summary = cli_run
    with open(output / "metrics.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(summary))
    assert saved["head"] == SOURCE and saved["head_index"] == 1 and saved["num_structures"] == 4

    model = jmp_jax.load_pretrained(checkpoint)
    direct = model.predict([evaluate.record_to_atoms(r) for r in records], head=SOURCE)
    energy_true = np.array([r["energy"] for r in records])
    error = direct["energy"] - energy_true
    metrics = saved["metrics"]
    assert metrics["energy"]["mae"] == pytest.approx(np.mean(np.abs(error)), rel=1e-5)
    assert metrics["energy"]["rmse"] == pytest.approx(np.sqrt(np.mean(error ** 2)), rel=1e-5)
    natoms = np.array([len(r["atomic_numbers"]) for r in records])
    assert metrics["energy_per_atom"]["mae"] == pytest.approx(np.mean(np.abs(error) / natoms), rel=1e-5)

    free = np.concatenate([~r["fixed"] for r in records])
    assert 0 < free.sum() < len(free)  # the slab's bottom layer is left out
    force_error = (np.concatenate(direct["forces"]) - np.concatenate([r["forces"] for r in records]))[free]
    assert metrics["forces"]["count"] == free.sum()
    assert metrics["forces"]["mae"] == pytest.approx(np.mean(np.abs(force_error)), rel=1e-4)
    assert metrics["forces"]["rmse"] == pytest.approx(np.sqrt(np.mean(force_error ** 2)), rel=1e-4)
    gap_error = direct["energy"] - np.array([r["targets"]["gap"] for r in records])
    assert metrics["target"]["mae"] == pytest.approx(np.mean(np.abs(gap_error)), rel=1e-5)

    saved_predictions = np.load(output / "predictions.npz")
    np.testing.assert_allclose(saved_predictions["energy_pred"], direct["energy"], rtol=1e-6)
    np.testing.assert_array_equal(saved_predictions["force_mask"], free)


def test_cli_writes_valid_parity_pngs(cli_run):
    from matplotlib import image

    output, summary = cli_run
    assert summary["plots"] == ["energy.png", "forces.png", "target.png"]
    for name in summary["plots"]:
        with open(output / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        pixels = image.imread(output / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
        assert pixels[..., :3].std() > 0.05  # not a blank canvas
    assert image.imread(output / "forces.png").shape[1] > 2 * image.imread(output / "energy.png").shape[1]


def test_cli_options_and_errors(setup, tmp_path):
    root, checkpoint, _ = setup
    base = ["--checkpoint", checkpoint, "--data", str(root / "data"), "--source", SOURCE, "--split", SPLIT]
    summary = evaluate.main(base + ["--head", "0", "--max-structures", "2", "--output", str(tmp_path / "two")])
    assert summary["head"] == "molecules" and summary["num_structures"] == 2 and summary["target"] is None
    assert "target" not in summary["metrics"] and summary["metrics"]["energy"]["count"] == 2
    with pytest.raises(EvaluationInputError, match=r"target 'homo' missing from 4 records, e.g. 'tiny:0'"):
        evaluate.main(base + ["--target", "homo", "--output", str(tmp_path / "bad")])
    with pytest.raises(FileNotFoundError, match="no prepared split catalysis-val"):
        evaluate.main(base[:-1] + ["val", "--output", str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="unknown head 'oc20'"):
        evaluate.main(base + ["--head", "oc20", "--output", str(tmp_path / "bad")])


def finetune_task(kind: str, **fields) -> dict:
    """A small fine-tuning task on the tiny split (molecules and slab without PBC, 6 Å), as the fine-tuning
    run stores it (`config.task.to_dict()`)."""
    task = dict(base_task(), name=f"tiny_{kind}", source=SOURCE, kind=kind, cutoff=6.0, max_neighbors=20,
                pbc=False, reduction="mean", **fields)
    return ml_collections.ConfigDict(task).to_dict()


def random_finetune_variables(task: dict, records, seed: int = 0) -> tuple[dict, dict]:
    """(variables, metadata) of a FinetuneModel with random weights: shapes from eval_shape (no compile),
    N(0, 1/fan_in) kernels, N(0, 1) embeddings, scale factors 0.2 (as test_pretrained's random model)."""
    spec = loop.head_spec(ml_collections.ConfigDict(task))
    config = finetune_model.backbone_for(demo(), spec)
    module = finetune_model.FinetuneModel(config, spec)
    data_spec = finetune_data.DataSpec(SOURCE, task["cutoff"], task["max_neighbors"], task["pbc"], 4)
    graphs = [finetune_data.build_graphs(r, data_spec, i) for i, r in enumerate(records)]
    example = batching.collate(graphs, bucketed_budgets(graphs))
    shapes = jax.eval_shape(lambda key: module.init(key, example), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale_factor":
            return np.full(leaf.shape, 0.2, np.float32)
        scale = 1.0 if name == "embedding" else 0.1 if name == "bias" else int(np.prod(leaf.shape[:-1])) ** -0.5
        return rng.normal(scale=scale, size=leaf.shape).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, dict(shapes))
    norm = Normalization(target_mean=task["target_mean"] or 0.0, target_std=task["target_std"] or 1.0,
                         force_std=task["force_std"] or 1.0, class_weights=tuple(task["class_weights"]) or None)
    metadata = {**orbax_io.make_metadata(config, 0, "random init (test)", ema=False),
                "finetune": {"task": task, "normalization": dataclasses.asdict(norm)}}
    return variables, metadata


def random_finetuned_model(task: dict, records) -> jmp_jax.FinetunedModel:
    variables, metadata = random_finetune_variables(task, records)
    return jmp_jax.FinetunedModel(BackboneConfig.from_jmp_dict(metadata["config"]), variables, metadata)


def test_cli_classifier_checkpoint_balanced_accuracy(setup, tmp_path):
    """A fine-tuning workdir (<workdir>/best/<epoch>) with a 2-class head: logits and balanced accuracy."""
    root, _, records = setup
    task = finetune_task("classification", target="is_metal", num_classes=2, dropout=0.5,
                         class_weights=(1.0, 1.34))
    variables, metadata = random_finetune_variables(task, records)
    orbax_io.save_variables(tmp_path / "run" / "best", variables, metadata, step=3)
    summary = evaluate.main(["--checkpoint", str(tmp_path / "run"), "--data", str(root / "data"), "--source", SOURCE,
                             "--split", SPLIT, "--output", str(tmp_path / "out")])
    assert summary["kind"] == "classification" and summary["target"] == "is_metal"
    assert set(summary["metrics"]) == {"classification"} and summary["plots"] == []

    # The same model applied directly (no dropout at evaluation) on one batch of all records.
    spec = loop.head_spec(ml_collections.ConfigDict(task))
    module = finetune_model.FinetuneModel(finetune_model.backbone_for(demo(), spec), spec)
    data_spec = finetune_data.DataSpec(SOURCE, 6.0, 20, False, 4)
    graphs = [finetune_data.build_graphs(r, data_spec, i) for i, r in enumerate(records)]
    batch = batching.collate(graphs, batching.budgets_for(graphs))
    logits = np.asarray(jax.jit(module.apply)(variables, batch)["logits"])[:len(records)]
    saved = np.load(tmp_path / "out" / "predictions.npz")
    np.testing.assert_allclose(saved["logits_pred"], logits, rtol=1e-4, atol=1e-5)
    labels = np.array([r["targets"]["is_metal"] for r in records], int)
    np.testing.assert_array_equal(saved["labels_true"], labels)
    metrics = summary["metrics"]["classification"]
    assert metrics["balanced_accuracy"] == pytest.approx(evaluation.balanced_accuracy(logits.argmax(1), labels))
    assert metrics["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    with pytest.raises(ValueError, match="unknown head 'oc20'; .* has one head: 0='tiny_classification'"):
        evaluate.load_head(str(tmp_path / "run"), source=SOURCE, head="oc20", forces=None)
    with pytest.raises(ValueError, match=r"a classification head\) predicts no forces \(metadata key finetune"):
        evaluate.load_head(str(tmp_path / "run"), source=SOURCE, head=None, forces="direct")


def test_scalar_head_is_denormalised(setup, tmp_path):
    root, _, records = setup
    task = finetune_task("scalar", target="gap", target_mean=3.0, target_std=2.0)
    head = evaluate.FinetunedHead(random_finetuned_model(task, records), batch_size=4)
    summary = evaluate.evaluate_split(head, records, str(tmp_path), info={"source": SOURCE, "split": SPLIT})
    assert summary["target"] == "gap" and summary["plots"] == ["target.png"]
    first = np.load(tmp_path / "predictions.npz")["target_pred"]
    gap = np.array([r["targets"]["gap"] for r in records])
    assert summary["metrics"]["target"]["mae"] == pytest.approx(np.mean(np.abs(first - gap)))
    # Other statistics, same weights (and compiled forward): prediction = normalised output * std + mean.
    head.model.normalization = dict(head.model.normalization, target_mean=-1.0, target_std=0.5)
    second = head.predict(records, "gap")["target"]
    np.testing.assert_allclose(second, (first - 3.0) / 2.0 * 0.5 - 1.0, rtol=1e-6, atol=1e-6)


def test_format_table_lists_every_group():
    metrics = {"energy": {"mae": 0.5, "rmse": 0.7, "count": 4},
               "forces": {"mae": 0.1, "rmse": 0.2, "l2_mae": 0.25, "count": 30},
               "classification": {"balanced_accuracy": 0.75, "accuracy": 0.8, "count": 10}}
    lines = evaluate.format_table(metrics).splitlines()
    assert lines[0].split() == ["quantity", "MAE", "RMSE", "unit", "n"]
    assert lines[1].split() == ["energy", "0.5", "0.7", "eV", "4"]
    assert lines[3].split() == ["forces", "|dF|", "0.25", "eV/Å", "30"]
    assert lines[4].split() == ["balanced", "acc.", "0.7500", "10"]


def test_forces_head_scores_forces_only(setup, tmp_path):
    """A forces-only task (gradient forces): forces in eV/Å (times force_std) on free atoms; energy not scored."""
    root, _, records = setup
    task = finetune_task("forces", force_std=1.5)
    head = evaluate.FinetunedHead(random_finetuned_model(task, records), batch_size=4)
    assert head.forces == "gradient" and head.default_target is None
    summary = evaluate.evaluate_split(head, records, str(tmp_path))
    assert set(summary["metrics"]) == {"forces"} and summary["plots"] == ["forces.png"]
    saved = np.load(tmp_path / "predictions.npz")
    assert saved["forces_pred"].shape == (sum(len(r["atomic_numbers"]) for r in records), 3)
    free = saved["force_mask"]
    error = (saved["forces_pred"] - np.concatenate([r["forces"] for r in records]))[free]
    assert summary["metrics"]["forces"]["mae"] == pytest.approx(np.mean(np.abs(error)))
    assert summary["metrics"]["forces"]["count"] == free.sum() and np.abs(saved["forces_pred"]).max() > 0


def test_read_tasks(tmp_path):
    good, bad = tmp_path / "tasks.json", tmp_path / "bad.json"
    good.write_text('[{"name": "molecule", "energy_std": 1.0, "force_std": 0.5}]')
    bad.write_text('{"name": "molecule"}')
    assert evaluate.read_tasks(str(good)) == [{"name": "molecule", "energy_std": 1.0, "force_std": 0.5}]
    assert evaluate.read_tasks(None) is None
    with pytest.raises(EvaluationInputError, match="expected a JSON list of task objects"):
        evaluate.read_tasks(str(bad))
