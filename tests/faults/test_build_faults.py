"""Fault injection into data builds: rebuilds (shards, record indexes, metadata) are byte-identical across
processes, a killed build's temporary folder is removed by the next one, and empty or unwritable outputs are
clear errors."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from data_prep import shard_writer
from jmp_jax.data import records

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Records with several scalar targets: the feature map then has many keys to order.
WRITE_SPLIT = """
    import sys
    import numpy as np
    from data_prep import shard_writer
    from jmp_jax.data import records

    def frames(n):
        for i in range(n):
            rng = np.random.default_rng(i)
            yield records.make_record([8, 1, 1], rng.normal(size=(3, 3)), source_id=f"mol{i}", energy=-float(i),
                                      forces=rng.normal(size=(3, 3)), targets={"gap": 0.5 * i, "homo": -i, "mu": 2.0})
"""


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITE_SPLIT) + textwrap.dedent(code), *args],
                            env=env, cwd=REPO, **kw)


def _files(directory: str) -> dict[str, bytes]:
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def _expected(n: int) -> list[dict]:
    namespace = {}
    exec(textwrap.dedent(WRITE_SPLIT), namespace)
    return list(namespace["frames"](n))


def test_builds_in_two_processes_are_byte_identical(tmp_path):
    write = """
        shard_writer.write_split(frames(6), sys.argv[1], "toy", "train", records_per_shard=4, units={}, source_files=[])
    """
    assert _python(write, str(tmp_path / "a")).wait() == 0
    shard_writer.write_split(_expected(6), str(tmp_path / "b"), "toy", "train", records_per_shard=4, units={},
                        source_files=[])
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(first) == ["toy-train.metadata.json", "toy-train.tfrecord-00000-of-00002",
                             "toy-train.tfrecord-00000-of-00002.index", "toy-train.tfrecord-00001-of-00002",
                             "toy-train.tfrecord-00001-of-00002.index"]
    assert first == second


def test_killed_build_leaves_a_tmp_folder_that_the_rebuild_removes(tmp_path):
    out = str(tmp_path)
    stalled = """
        def stall():
            yield from frames(5)
            print("written", flush=True)
            sys.stdin.read()  # waits here, mid-build, for the kill

        shard_writer.write_split(stall(), sys.argv[1], "toy", "train", records_per_shard=2, units={}, source_files=[])
    """
    build = _python(stalled, out, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert build.stdout.readline() == "written\n"
    finally:
        build.send_signal(signal.SIGKILL)
        build.wait()
        build.stdin.close()
        build.stdout.close()
    assert [name for name in os.listdir(out) if name.startswith(".tmp-toy-train-")]  # the killed build's leftovers
    assert not os.path.exists(records.metadata_path(out, "toy", "train"))

    expected = _expected(7)
    shard_writer.write_split(expected, out, "toy", "train", records_per_shard=2, units={}, source_files=[])
    assert not [name for name in os.listdir(out) if name.startswith(".tmp")]
    stored = list(records.iterate_records(out, "toy", "train"))
    assert [r["source_id"] for r in stored] == [r["source_id"] for r in expected]
    np.testing.assert_allclose(stored[6]["positions"], expected[6]["positions"], rtol=1e-6)


def test_build_whose_every_frame_is_skipped_is_an_error(tmp_path):
    frames = [records.make_record([1, 1], [[0.0, 0.0, 0.0], [np.nan, 0.0, 0.0]], source_id=f"nan{i}", energy=-1.0)
              for i in range(3)]
    with pytest.raises(records.RecordError, match=r"toy-train: no records to write \(every one skipped: "
                                                  r"\{'nan_positions': 3\}\)"):
        shard_writer.write_split(frames, str(tmp_path), "toy", "train", units={}, source_files=[])
    with pytest.raises(records.RecordError, match="toy-val: no records to write .the input holds none"):
        shard_writer.write_split([], str(tmp_path), "toy", "val", units={}, source_files=[])
    assert os.listdir(tmp_path) == []


def test_unwritable_output_folder_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    frame = records.make_record([1, 1], [[0.0, 0.0, 0.0], [0.74, 0.0, 0.0]], source_id="h2", energy=-1.0)
    with pytest.raises(OSError, match=rf"^cannot write the split toy-train to {blocker}/out: Not a directory$"):
        shard_writer.write_split([frame], str(blocker / "out"), "toy", "train", units={}, source_files=[])
