import json

import numpy as np
import pytest

import fixture_batch as fb
from fixture_files import array_digest, reference_path
from jmp_jax import convert
from jmp_jax.checkpoint import lightning, names, orbax_io
from jmp_jax.models.config import BackboneConfig, jmp_s

def _reference_digests() -> dict[str, dict[str, str]]:
    """{"weights": the reference's weights.npz, "ema_weights": the checkpoint's EMA per parameter key}, each as
    {torch key: array_digest} (tests/fixtures/README.md)."""
    with open(reference_path("reference_digests.json")) as f:
        return json.load(f)


def _as_torch_state_dict(variables):
    """Restored Flax variables -> {torch key: array} through the inverse name mapping."""
    out = {}
    for collection in ("params", "constants"):
        for path, leaf in names.flatten_variables(variables[collection]).items():
            key, transform = names.flax_to_torch(collection, path)
            array = np.asarray(leaf)
            out[key] = array.T if transform == names.TRANSPOSE else array
    return out


def _assert_reproduces(restored, ema: bool):
    """The restored variables are exactly the reference's weights, with the EMA arrays in place of the
    parameters when `ema`."""
    digests = _reference_digests()
    expected = {**digests["weights"], **(digests["ema_weights"] if ema else {})}
    got = {key: array_digest(array) for key, array in _as_torch_state_dict(restored).items()}
    assert got == {k: v for k, v in expected.items() if not names.dropped_reason(k)}


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("raw") / "ckpt")
    assert convert.main(["--checkpoint", reference_path("jmp_style_checkpoint.pt"), "--output", out]) == 0
    return out


def test_raw_conversion_reproduces_weights(raw_dir, capsys):
    variables, metadata = orbax_io.load_variables(raw_dir)
    _assert_reproduces(variables, ema=False)
    assert metadata["ema"] is False and metadata["num_tasks"] == 1
    assert orbax_io.read_metadata(raw_dir) == metadata and metadata["source"].endswith("jmp_style_checkpoint.pt")
    assert BackboneConfig.from_jmp_dict(metadata["config"]) == BackboneConfig.from_json(reference_path("config.json"))


def test_ema_conversion_reproduces_ema_weights(tmp_path):
    out = str(tmp_path / "ema")
    summary = convert.convert(reference_path("jmp_style_checkpoint.pt"), out, ema=True,
                              config=convert.resolve_config(reference_path("config.json")))
    assert summary["weights"] == "ema" and summary["notes"] == [] and summary["num_tasks"] == 1
    variables, metadata = orbax_io.load_variables(out, config=BackboneConfig.from_json(reference_path("config.json")),
                                                  num_tasks=1)
    assert metadata["ema"] is True
    # EMA replaces parameters only: buffers (scale factors) are the raw state dict's.
    _assert_reproduces(variables, ema=True)


def test_ema_state_dict_matchesreference_path():
    ckpt = lightning.load_checkpoint(reference_path("jmp_style_checkpoint.pt"))
    got = lightning.ema_state_dict(ckpt)
    expected = _reference_digests()["ema_weights"]
    assert list(got) == list(expected)
    assert {key: array_digest(array) for key, array in got.items()} == expected


def test_ema_alias_follows_target_or_jmp_load_order():
    ckpt = lightning.load_checkpoint(reference_path("jmp_style_checkpoint.pt"))
    raw, ema = lightning.state_dict(ckpt), lightning.ema_state_dict(ckpt)
    alias = "backbone.out_blocks.1.seq_energy_pre.2.dense_mlp.0.linear.weight"
    target = alias.replace("seq_energy_pre", "layers")
    assert not np.array_equal(raw[target], ema[target])
    consistent = lightning.with_ema(ckpt)
    np.testing.assert_array_equal(consistent[alias], ema[target])
    np.testing.assert_array_equal(consistent[target], ema[target])
    as_jmp = lightning.with_ema(ckpt, as_jmp_loads=True)
    np.testing.assert_array_equal(as_jmp[target], raw[target])
    other = "backbone.out_blocks.1.seq_energy2.0.dense_mlp.0.linear.weight"
    np.testing.assert_array_equal(as_jmp[other], ema[other])


def test_ema_count_mismatch_is_an_error():
    ckpt = lightning.load_checkpoint(reference_path("jmp_style_checkpoint.pt"))
    ckpt["optimizer_states"][0]["ema"] = ckpt["optimizer_states"][0]["ema"][:-1]
    with pytest.raises(lightning.LightningCheckpointError, match="201 tensors but the state dict has 202"):
        lightning.ema_state_dict(ckpt)


def test_inferred_config_and_hparams(raw_dir):
    ckpt = lightning.load_checkpoint(reference_path("jmp_style_checkpoint.pt"))
    config, notes = lightning.backbone_config(ckpt, lightning.state_dict(ckpt))
    assert config == BackboneConfig.from_json(reference_path("config.json")) and notes == []
    # Shapes win over a stale hparams config (JMP-L's pre-training config still names base() sizes).
    ckpt["hyper_parameters"] = {"hparams": {"backbone": jmp_s().to_dict()}}
    config, notes = lightning.backbone_config(ckpt, lightning.state_dict(ckpt))
    assert config.num_blocks == 2 and any("num_blocks=4" in n for n in notes)


def test_wrong_config_restore_is_refused(raw_dir):
    with pytest.raises(orbax_io.CheckpointMismatchError,
                       match="another config(.|\n)*num_blocks: checkpoint 2, expected 4"):
        orbax_io.load_variables(raw_dir, config=jmp_s())
    variables, _ = orbax_io.load_variables(raw_dir)
    target = {"params": dict(variables["params"]), "constants": variables["constants"]}
    target["params"]["embedding"] = {"atom_embedding": {"embedding": np.zeros((120, 32), np.float32)}}
    with pytest.raises(orbax_io.CheckpointMismatchError, match="embedding/atom_embedding/embedding"):
        orbax_io.load_variables(raw_dir, target=target)


def test_training_checkpoint_latest_step_ema_by_default(tmp_path):
    import orbax.checkpoint as ocp

    metadata = orbax_io.make_metadata(jmp_s(), 4, "training", ema=False)
    constants = {"s": {"scale_factor": np.float32(2.0)}}
    with ocp.CheckpointManager(str(tmp_path)) as manager:  # what a training loop writes, async included
        for step in (1, 2):
            raw = {"w": np.full((2, 3), step, np.float32)}
            args = orbax_io.save_args({"params": raw, "constants": constants}, metadata,
                                      ema_params={"w": raw["w"] + 0.5})
            manager.save(step, args=ocp.args.Composite(**args, opt_state=ocp.args.StandardSave({"mu": raw["w"]})))
        manager.wait_until_finished()
    variables, meta = orbax_io.load_variables(tmp_path, config=jmp_s(), num_tasks=4)
    np.testing.assert_array_equal(variables["params"]["w"], np.full((2, 3), 2.5))
    assert variables["constants"]["s"]["scale_factor"].shape == () and meta["ema"] is True
    variables, meta = orbax_io.load_variables(tmp_path / "1", use_ema=False)
    np.testing.assert_array_equal(variables["params"]["w"], np.full((2, 3), 1.0))
    assert meta["ema"] is False


def test_bad_state_dict_lists_every_problem(tmp_path, capsys):
    state = fb.load_state_dict()
    del state["backbone.int_blocks.0.dense_ca.linear.weight"]
    state["backbone.int_blocks.0.not_a_layer.linear.weight"] = np.zeros((4, 4), np.float32)
    state["backbone.bases.mlp_rbf_h.linear.weight"] = np.zeros((3, 3), np.float32)
    path = tmp_path / "bad.npz"
    np.savez(path, **state)
    rc = convert.main(["--checkpoint", str(path), "--output", str(tmp_path / "out"),
                       "--config", reference_path("config.json")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "missing: backbone.int_blocks.0.dense_ca.linear.weight" in err
    assert "unknown: backbone.int_blocks.0.not_a_layer.linear.weight" in err
    assert "shape: backbone.bases.mlp_rbf_h.linear.weight" in err


def test_npz_without_ema_and_bad_config_are_clear(tmp_path, capsys):
    weights = str(tmp_path / "weights.npz")
    np.savez(weights, **fb.load_state_dict())
    assert convert.main(["--checkpoint", weights, "--output", str(tmp_path / "o"), "--ema"]) == 2
    assert "no optimizer_states[0]['ema']" in capsys.readouterr().err
    assert convert.main(["--checkpoint", weights, "--output", str(tmp_path / "o"),
                         "--config", "jmp_xl"]) == 2
    assert "--config 'jmp_xl'" in capsys.readouterr().err
