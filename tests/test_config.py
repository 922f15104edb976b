import json
import os

import pytest

from jmp_jax.models import config as config_lib

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "gemnet_oc_reference")


@pytest.mark.parametrize("name,manifest", [("jmp_s", "params_manifest_jmp_s.json"),
                                           ("jmp_l", "params_manifest_jmp_l.json")])
def test_named_configs_match_manifests(name, manifest):
    path = os.path.join(FIXTURES, manifest)
    if not os.path.exists(path):
        pytest.skip("shared fixtures absent")
    with open(path) as f:
        expected = config_lib.BackboneConfig.from_jmp_dict(json.load(f)["config"])
    assert config_lib.NAMED_CONFIGS[name]() == expected


def test_unsupported_basis_is_rejected():
    with pytest.raises(ValueError, match="sbf"):
        config_lib.BackboneConfig.from_jmp_dict({"sbf": {"name": "spherical_harmonics"}})


def test_demo_config_is_the_fixture_config():
    path = os.path.join(FIXTURES, "config.json")
    if not os.path.exists(path):
        pytest.skip("shared fixtures absent")
    assert config_lib.demo() == config_lib.BackboneConfig.from_json(path)
