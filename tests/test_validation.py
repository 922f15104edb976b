"""Pre-training validation keeps each task's pipeline across evaluations: every evaluation rewinds it and
sees the same batches as a freshly opened pipeline, without reopening the split."""
import types

import numpy as np
from ase.build import molecule

from configs import pretrain_common
from data_prep import shard_writer
from jmp_jax.data import records
from jmp_jax.data import task_data
from jmp_jax.training import loop, sharding

NAMES = ("H2O", "NH3", "CH4", "C2H6", "CH3OH", "HCN", "C2H4")


def _config(tmp_path):
    for split, n in (("train", 7), ("val", 12)):
        atoms = [molecule(NAMES[i % len(NAMES)]) for i in range(n)]
        recs = [records.make_record(a.numbers, a.positions, source_id=f"{split}{i}", energy=-float(i),
                                    forces=np.zeros((len(a), 3))) for i, a in enumerate(atoms)]
        shard_writer.write_split(recs, str(tmp_path), "toy", split, records_per_shard=5, units={}, source_files=[])
    config = pretrain_common.pretrain_config("jmp_s")
    config.data.dir = str(tmp_path)
    config.data.tasks = [dict(pretrain_common.DEFAULT_TASKS[1], name="toy", source="toy", linear_reference=False)]
    config.log.eval_batches = 2
    return config


def _energies_eval(seen: list):
    """An eval step that records each batch's padded energies and reports their sum as the loss (the
    evaluation's loss is then the mean of these sums)."""
    def eval_fn(task):
        def step(params, constants, batch):
            energy = np.asarray(batch.energy)
            seen.append(energy)
            return {"loss": energy.sum(), "energy_abs_sum": np.abs(energy).sum(), "energy_count": energy.size,
                    "forces_abs_sum": 0.0, "forces_count": 1}
        return step
    return eval_fn


def test_validation_rewinds_its_pipelines_without_reopening_the_split(tmp_path, monkeypatch):
    config = _config(tmp_path)
    tasks = task_data.load_tasks(config)
    validation = loop.Validation(config, tasks)
    fresh = task_data.make_pipeline(config, tasks, split="val", training=False, only_task=0)
    expected = [next(fresh)[1].energy for _ in range(2)]
    fresh.close()

    def no_reopen(*args):
        raise AssertionError(f"split reopened: {args}")

    monkeypatch.setattr(task_data, "open_source", no_reopen)
    seen, state, mesh = [], types.SimpleNamespace(ema_params=None, constants=None), sharding.make_mesh()
    first = validation(state, _energies_eval(seen), mesh)
    second = validation(state, _energies_eval(seen), mesh)
    assert first == second and first["val/loss/toy"] == np.mean([e.sum() for e in expected])
    for got, want in zip(seen, expected + expected):
        np.testing.assert_array_equal(got.reshape(want.shape), want)
