"""The `python -m data_prep.build` entry point: one source per call, idempotent output."""
import json
import os

import numpy as np
import pytest

from data_prep import build
from jmp_jax.data import records
from fixture_files import data_path


@pytest.fixture(scope="module")
def md17_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("raw") / "rmd17_benzene.npz")
    rng = np.random.default_rng(0)
    energies = rng.normal(size=1020) - 5000
    energies[[3, 700]] = np.nan  # missing labels are skipped and counted, not lost
    np.savez(path, nuclear_charges=np.array([6, 6, 1]), coords=rng.normal(size=(1020, 3, 3)),
             energies=energies, forces=rng.normal(size=(1020, 3, 3)))
    return path


def _files(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_cli_writes_all_splits_and_rebuild_is_identical(tmp_path, md17_file, capsys):
    out = str(tmp_path / "out")
    argv = ["--source", "rmd17", "--input", md17_file, "--output", out, "--records-per-shard", "400"]
    assert build.main(argv) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(p["source"], p["split"]) for p in printed] == [("rmd17_benzene", s) for s in ("train", "val", "test")]
    metas = {s: records.load_metadata(out, "rmd17_benzene", s) for s in ("train", "val", "test")}
    assert sum(m["num_records"] for m in metas.values()) == 1018
    assert sum(m["skipped"]["nan_labels"] for m in metas.values()) == 2
    assert metas["train"]["num_shards"] == 3 and metas["train"]["units"]["energy"] == "eV"
    assert metas["train"]["source_files"][0]["sha256"] == metas["test"]["source_files"][0]["sha256"]
    first = _files(out)
    assert build.main(argv) == 0
    assert _files(out) == first
    ids = {s: {r["source_id"] for r in records.iterate_records(out, "rmd17_benzene", s)} for s in metas}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"]


def test_cli_split_filter(tmp_path, md17_file):
    out = str(tmp_path / "out")
    assert build.main(["--source", "rmd17", "--input", md17_file, "--output", out, "--split", "val"]) == 0
    assert sorted(os.listdir(out)) == ["rmd17_benzene-val.metadata.json", "rmd17_benzene-val.tfrecord-00000-of-00001",
                                       "rmd17_benzene-val.tfrecord-00000-of-00001.index"]
    assert build.main(["--source", "rmd17", "--input", md17_file, "--output", out, "--split", "bogus"]) == 2


def test_cli_max_records_keeps_the_first_records_of_each_split(tmp_path, md17_file):
    out, full = str(tmp_path / "out"), str(tmp_path / "full")
    assert build.main(["--source", "rmd17", "--input", md17_file, "--output", out, "--max-records", "3"]) == 0
    assert build.main(["--source", "rmd17", "--input", md17_file, "--output", full, "--split", "val"]) == 0
    for split in ("train", "val", "test"):
        meta = records.load_metadata(out, "rmd17_benzene", split)
        assert meta["num_records"] == 3 and meta["max_records"] == 3
    first = [r["source_id"] for r in records.iterate_records(out, "rmd17_benzene", "val")]
    assert first == [r["source_id"] for r in records.iterate_records(full, "rmd17_benzene", "val")][:3]
    with pytest.raises(SystemExit):
        build.main(["--source", "rmd17", "--input", md17_file, "--output", out, "--max-records", "3", "--workers", "2"])


def test_cli_errors_name_the_input(tmp_path, capsys):
    bad = tmp_path / "rmd17_broken.npz"
    bad.write_bytes(b"not an npz")
    assert build.main(["--source", "rmd17", "--input", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "rmd17_broken.npz" in capsys.readouterr().err
    assert build.main(["--source", "oc20", "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "--split" in capsys.readouterr().err


def test_cli_oc22_stand_in_with_tfds_metadata(tmp_path):
    oxides = data_path("oxides", "fairchem_docs_oxides.db")
    out = str(tmp_path / "oc22")
    assert build.main(["--source", "oc22", "--input", oxides, "--output", out, "--split", "train", "--tfds"]) == 0
    meta = records.load_metadata(out, "oc22", "train")
    assert meta["num_records"] == 295 and meta["has_forces"] and meta["target_names"] == []
    assert len(meta["linear_reference"]) == 119 and meta["linear_reference"][8] != 0  # oxygen
    assert meta["referenced"]["energy_std"] < meta["raw"]["energy_std"]
    assert os.path.exists(os.path.join(out, "features.json"))
    first = next(records.iterate_records(out, "oc22", "train"))
    assert first["energy"] == pytest.approx(-41.358821) and first["cell"].any()
