"""Fault injection into a torch .pt checkpoint: damaged bytes are refused by the reader and the converter,
naming the file and the zip member (storage) that fails its CRC-32."""
import numpy as np
import pytest

from jmp_jax import convert
from jmp_jax.checkpoint import torch_pickle

WEIGHT = (np.arange(256, dtype=np.float32) / 7.0).reshape(16, 16)


@pytest.fixture
def checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": {"backbone.atom_emb.embeddings.weight": torch.from_numpy(WEIGHT.copy())}}, path)
    return path


def _flip(path, at: int, count: int) -> None:
    data = bytearray(path.read_bytes())
    data[at:at + count] = bytes(b ^ 0xFF for b in data[at:at + count])
    path.write_bytes(bytes(data))


def test_sixteen_flipped_bytes_in_a_weight_storage_are_refused(checkpoint, capsys):
    np.testing.assert_array_equal(torch_pickle.load(checkpoint)["state_dict"]["backbone.atom_emb.embeddings.weight"],
                                  WEIGHT)  # intact, it reads back exactly
    _flip(checkpoint, checkpoint.read_bytes().index(WEIGHT.tobytes()) + 512, 16)
    with pytest.raises(torch_pickle.TorchCheckpointError,
                       match=r"tiny\.pt: storage tiny/data/0 fails its zip CRC-32 check .*the file is damaged"):
        torch_pickle.load(checkpoint)
    assert convert.main(["--checkpoint", str(checkpoint), "--output", str(checkpoint.parent / "out")]) == 2
    assert "tiny.pt: storage tiny/data/0 fails its zip CRC-32 check" in capsys.readouterr().err


def test_flipped_byte_in_the_pickle_is_refused(checkpoint):
    data = checkpoint.read_bytes()
    _flip(checkpoint, data.index(b"backbone.atom_emb"), 1)  # a key name inside data.pkl
    with pytest.raises(torch_pickle.TorchCheckpointError, match=r"tiny\.pt.*Bad CRC-32 for file 'tiny/data.pkl'"):
        torch_pickle.load(checkpoint)
