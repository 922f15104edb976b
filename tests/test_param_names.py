"""Flax parameter tree vs the PyTorch state_dict names (params manifests of JMP-S / JMP-L)."""
from __future__ import annotations

import json
import math
import re

import flax
import jax
import numpy as np
import pytest

import fixture_batch as fb
from jmp_jax.checkpoint import names
from jmp_jax.models.config import jmp_l, jmp_s
from jmp_jax.models.jmp import variable_shapes
from jmp_jax.models.layers import BasisEmbedding, Dense

MANIFESTS = {"jmp_s": ("params_manifest_jmp_s.json", jmp_s, 44_131_328),
             "jmp_l": ("params_manifest_jmp_l.json", jmp_l, 234_267_648)}


def _manifest(file_name: str) -> dict:
    with open(fb.reference_path(file_name)) as f:
        return json.load(f)


@pytest.fixture(scope="module", params=sorted(MANIFESTS))
def model_and_manifest(request):
    file_name, make_config, expected_count = MANIFESTS[request.param]
    shapes = variable_shapes(make_config(), num_tasks=4)  # jax.eval_shape: nothing is allocated
    return shapes, _manifest(file_name), expected_count


def test_trainable_parameter_count(model_and_manifest):
    shapes, manifest, expected_count = model_and_manifest
    count = sum(math.prod(leaf.shape) for leaf in names.flatten_variables(shapes["params"]).values())
    assert count == expected_count == manifest["num_parameters_total"]


def test_manifest_keys_map_one_to_one(model_and_manifest):
    shapes, manifest, _ = model_and_manifest
    flax_leaves = {(col, path): leaf.shape for col in ("params", "constants")
                   for path, leaf in names.flatten_variables(shapes[col]).items()}
    hit = set()
    for entry in manifest["state_dict"]:
        key, shape = entry["key"], tuple(entry["shape"])
        if names.dropped_reason(key):
            continue
        collection, path, transform = names.torch_to_flax(key)
        assert (collection, path) in flax_leaves, key
        expected = shape[::-1] if transform == names.TRANSPOSE else shape
        assert tuple(flax_leaves[(collection, path)]) == expected, key
        assert names.flax_to_torch(collection, path) == (key, transform)
        assert (collection, path) not in hit, key
        hit.add((collection, path))
    assert hit == set(flax_leaves)


def test_dropped_keys_are_only_buffers_and_aliases(model_and_manifest):
    _, manifest, _ = model_and_manifest
    dropped = [e["key"] for e in manifest["state_dict"] if names.dropped_reason(e["key"])]
    assert dropped and all(k.endswith(("rbf.offset", "rbf.temps")) or ".seq_energy_pre." in k for k in dropped)


def test_fixture_weights_convert_exactly():
    state_dict = fb.load_state_dict()
    variables = fb.load_variables()
    kernel = variables["params"]["backbone"]["int_blocks_0"]["trip_interaction"]["mlp_cbf"]["bilinear"]["kernel"]
    np.testing.assert_array_equal(
        kernel, state_dict["backbone.int_blocks.0.trip_interaction.mlp_cbf.bilinear.linear.weight"].T)
    np.testing.assert_array_equal(variables["params"]["backbone"]["bases"]["mlp_sbf_qint"]["weight"],
                                  state_dict["backbone.bases.mlp_sbf_qint.weight"])
    np.testing.assert_array_equal(variables["params"]["output"]["out_energy_0"]["linear_4"]["kernel"],
                                  state_dict["output.out_energy.0.8.weight"].T)
    assert float(variables["constants"]["backbone"]["out_blocks_1"]["scale_rbf_F"]["scale_factor"]) == float(
        state_dict["backbone.out_blocks.1.scale_rbf_F.scale_factor"])


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.update({"backbone.bases.not_a_layer.linear.weight": np.zeros((2, 2))}), "unknown"),
    (lambda sd: sd.pop("backbone.int_blocks.1.dense_ca.linear.weight"), "missing: backbone.int_blocks.1.dense_ca"),
    (lambda sd: sd.update({"output.out_forces.0.2.bias": np.zeros(3, np.float32)}),
     "shape: output.out_forces.0.2.bias"),
    (lambda sd: sd.update({"backbone.bases.radial_basis.rbf.temps": np.ones(16, np.float32)}), "rbf.temps"),
    (lambda sd: sd.update({"backbone.out_blocks.0.seq_energy_pre.0.dense_mlp.0.linear.weight":
                           np.zeros((64, 64), np.float32)}), "alias differs"),
])
def test_bad_state_dict_is_rejected_with_the_key(edit, message):
    state_dict = fb.load_state_dict()
    edit(state_dict)
    with pytest.raises(names.CheckpointMismatchError, match=message.replace(".", r"\.")):
        names.state_dict_to_variables(state_dict, variable_shapes(fb.load_config(), 1))


def test_packaged_scale_factors_fill_every_scale_factor(model_and_manifest):
    from jmp_jax.checkpoint.scale_factors import load_scale_factors, scale_factor_constants

    shapes, manifest, _ = model_and_manifest
    set_name = "jmp_s" if manifest["num_parameters_total"] == MANIFESTS["jmp_s"][2] else "jmp_l"
    constants = scale_factor_constants(load_scale_factors(set_name), shapes["constants"])
    flat = names.flatten_variables(constants)
    assert len(flat) == len(manifest["scale_factors"])
    for name, entry in manifest["scale_factors"].items():
        collection, path, _ = names.torch_to_flax(entry["state_dict_key"])
        assert collection == "constants" and float(flat[path]) == pytest.approx(entry["value"], rel=1e-7), name


def test_backbone_without_direct_forces_drops_only_the_force_branch():
    """Scalar fine-tuning configs (direct_forces=False) build no out_mlp_F / seq_forces / dense_rbf_F."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jmp_jax.models.gemnet import GemNetOCBackbone
    from jmp_jax.models.jmp import placeholder_batch

    manifest = _manifest(MANIFESTS["jmp_s"][0])
    config = dataclasses.replace(jmp_s(), direct_forces=False)
    batch = placeholder_batch()
    h = jnp.zeros((batch.num_nodes, config.emb_size_atom))
    backbone = GemNetOCBackbone(config)
    shapes = jax.eval_shape(lambda: backbone.init(jax.random.PRNGKey(0), h, batch))
    out = jax.eval_shape(lambda variables: backbone.apply(variables, h, batch), shapes)
    assert out.force_features is None and out.energy_features.shape == h.shape
    force_branch = (".out_mlp_F.", ".seq_forces.", ".dense_rbf_F.", ".scale_rbf_F.")
    expected = {}
    for entry in manifest["state_dict"]:
        key = entry["key"]
        if key.startswith("backbone.") and not names.dropped_reason(key) and not any(p in key for p in force_branch):
            collection, path, transform = names.torch_to_flax(key)
            shape = tuple(entry["shape"])
            expected[(collection, path[1:])] = shape[::-1] if transform == names.TRANSPOSE else shape
    actual = {(col, path): tuple(leaf.shape) for col in ("params", "constants")
              for path, leaf in names.flatten_variables(shapes[col]).items()}
    assert actual == expected


@pytest.mark.parametrize("module, name, wrong_shape", [(Dense(4), "kernel", (3, 5)),
                                                     (BasisEmbedding(6, num_spherical=2), "weight", (3, 2, 5))])
def test_a_parameter_of_another_shape_is_refused_by_name(module, name, wrong_shape):
    """The model's own shape check of existing parameters (`layers.float32_param`) names the parameter."""
    x = np.ones((2, 3), np.float32)
    want_shape = module.init(jax.random.key(0), x)["params"][name].shape
    message = (f'"{name}" in "/", the given initializer is expected to generate shape {want_shape}, but the '
               f'existing parameter it received has shape {wrong_shape}')
    with pytest.raises(flax.errors.ScopeParamShapeError, match=re.escape(message)):
        module.apply({"params": {name: np.zeros(wrong_shape, np.float32)}}, x)
