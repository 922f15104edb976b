import json

import pytest

from fixture_files import reference_path
from jmp_jax.models import config as config_lib


@pytest.mark.parametrize("name,manifest", [("jmp_s", "params_manifest_jmp_s.json"),
                                           ("jmp_l", "params_manifest_jmp_l.json")])
def test_named_configs_match_manifests(name, manifest):
    with open(reference_path(manifest)) as f:
        expected = config_lib.BackboneConfig.from_jmp_dict(json.load(f)["config"])
    assert config_lib.NAMED_CONFIGS[name]() == expected


def test_unsupported_basis_is_rejected():
    with pytest.raises(ValueError, match="sbf"):
        config_lib.BackboneConfig.from_jmp_dict({"sbf": {"name": "spherical_harmonics"}})


def test_demo_config_is_the_fixture_config():
    assert config_lib.demo() == config_lib.BackboneConfig.from_json(reference_path("config.json"))
