import dataclasses
import json
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from fixture_files import array_digest, reference_path
from jmp_jax.checkpoint import torch_pickle


@pytest.fixture(scope="module")
def checkpoint():
    return torch_pickle.load(reference_path("jmp_style_checkpoint.pt"))


def test_state_dict_equals_weights_npz(checkpoint):
    with open(reference_path("reference_digests.json")) as f:
        weights = json.load(f)["weights"]  # the reference's weights.npz: dtype, shape and bytes of each array
    assert list(checkpoint["state_dict"]) == list(weights)
    assert {k: array_digest(v) for k, v in checkpoint["state_dict"].items()} == weights


def test_ema_tuple_and_lightning_fields(checkpoint):
    ema = checkpoint["optimizer_states"][0]["ema"]
    assert isinstance(ema, tuple) and len(ema) == 202
    assert all(isinstance(e, np.ndarray) and e.dtype == np.float32 for e in ema)
    assert checkpoint["global_step"] == 1234 and checkpoint["pytorch-lightning_version"] == "2.2.1"


def test_hparams_stand_in_exposes_config_fields(checkpoint):
    hparams = checkpoint["hyper_parameters"]["hparams"]
    assert isinstance(hparams, torch_pickle.StandIn)
    assert (hparams.module, hparams.qualname) == ("jmp.models.gemnet.config", "BackboneConfig")
    with open(reference_path("config.json")) as f:
        assert hparams.fields == json.load(f)
    assert hparams.num_blocks == 2 and hparams.envelope == {"name": "polynomial", "exponent": 5}
    with pytest.raises(AttributeError):
        hparams.no_such_field


def test_truncated_and_non_zip_files_name_the_file(tmp_path):
    with open(reference_path("jmp_style_checkpoint.pt"), "rb") as f:
        data = f.read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(torch_pickle.TorchCheckpointError, match="truncated.pt"):
        torch_pickle.load(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02not a zip at all")
    with pytest.raises(torch_pickle.TorchCheckpointError, match="garbage.pt.*not a torch zip checkpoint"):
        torch_pickle.load(garbage)


def test_storage_shorter_than_tensor_is_an_error(tmp_path):
    src = reference_path("jmp_style_checkpoint.pt")
    bad = tmp_path / "short_storage.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            payload = zin.read(info)
            zout.writestr(info, payload[:8] if info.filename.endswith("/data/0") else payload)
    with pytest.raises(torch_pickle.TorchCheckpointError, match="short_storage.pt.*data/0"):
        torch_pickle.load(bad)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_unknown_callables_are_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"x": _Exploit(), "p": __import__("pathlib").Path("a")}, protocol=2))
    loaded = torch_pickle.load(path)
    assert not (tmp_path / "pwned").exists()
    assert isinstance(loaded["x"], torch_pickle.StandIn) and loaded["x"].args == ("touch pwned",)
    assert loaded["p"].qualname.endswith("Path")


@dataclasses.dataclass
class _Config:
    width: int
    tags: tuple


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def _save(torch, obj, path):
    torch.save(obj, path)
    return torch_pickle.load(path)


def test_dtypes_round_trip(torch, tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f64": torch.randn(3, 4, dtype=torch.float64, generator=gen),
        "f16": torch.randn(5, dtype=torch.float16, generator=gen),
        "bf16": torch.randn(2, 3, generator=gen).to(torch.bfloat16),
        "i64": torch.arange(-4, 8, dtype=torch.int64).reshape(3, 4),
        "i32": torch.arange(6, dtype=torch.int32),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.complex(torch.ones(2), torch.arange(2.0)),
    }
    loaded = _save(torch, tensors, tmp_path / "dtypes.pt")
    for key, t in tensors.items():
        expected = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if key == "bf16" else t.numpy()
        assert loaded[key].dtype == expected.dtype, key
        np.testing.assert_array_equal(loaded[key], expected, err_msg=key)


def test_views_scalars_and_shared_storage(torch, tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {
        "base": base,
        "transposed": base.t(),
        "sliced": base[1:, 2:5],
        "strided": base[::2, ::3],
        "row": base[2],
        "scalar": torch.tensor(3.5),
        "scalar_view": base[3, 4],
        "empty": base[:0],
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "nested": [torch.zeros(1), (torch.tensor(7, dtype=torch.int64),)],
    }
    loaded = _save(torch, obj, tmp_path / "views.pt")
    for key in ("base", "transposed", "sliced", "strided", "row", "scalar", "scalar_view", "empty"):
        assert loaded[key].shape == tuple(obj[key].shape), key
        np.testing.assert_array_equal(loaded[key], obj[key].numpy(), err_msg=key)
    assert loaded["scalar"].shape == () and loaded["scalar_view"] == 22.0
    np.testing.assert_array_equal(loaded["param"], np.ones((2, 2), np.float32))
    assert loaded["nested"][1][0] == 7 and loaded["nested"][1][0].dtype == np.int64
    # One storage for base and all its views: only one data file in the archive.
    with zipfile.ZipFile(tmp_path / "views.pt") as z:
        storage_files = [n for n in z.namelist() if "/data/" in n]
    assert len(storage_files) == 5  # base, scalar, param, zeros(1), tensor(7)


def test_unknown_classes_become_stand_ins(torch, tmp_path):
    loaded = _save(torch, {"hparams": _Config(width=8, tags=(1, 2)), "weights": torch.ones(2)},
                   tmp_path / "hparams.pt")
    hparams = loaded["hparams"]
    assert isinstance(hparams, torch_pickle.StandIn) and hparams.qualname == "_Config"
    assert hparams.fields == {"width": 8, "tags": (1, 2)}
    assert torch_pickle.to_plain(loaded["hparams"]) == {"width": 8, "tags": (1, 2)}


def test_big_endian_archive(torch, tmp_path):
    values = torch.linspace(-1.0, 1.0, 7)
    src = tmp_path / "little.pt"
    torch.save({"v": values}, src)
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(big, "w") as zout:
        for info in zin.infolist():
            payload = zin.read(info)
            if info.filename.endswith("/byteorder"):
                payload = b"big"
            elif "/data/" in info.filename and not info.filename.endswith("serialization_id"):
                payload = np.frombuffer(payload, "<f4").astype(">f4").tobytes()
            zout.writestr(info, payload)
    np.testing.assert_array_equal(torch_pickle.load(big)["v"], values.numpy())
