"""Test utility: paths of the fixture files kept in the repository (tests/fixtures, see its README.md),
of the real public data samples, and the decoding of the arrays stored there compactly.

A missing fixture is an error, never a skip: the suite has to check what it claims on any clone. The one
exception are the real public data samples: their README (../shared/data/README.md) asks that they not be
committed, so tests read them beside the repository. A clone without that folder skips those tests (and only
those: the readers are also tested on files the tests write); under CI (CI set) a missing sample fails.
"""
from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import pytest

FIXTURES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
REFERENCE_DIR = os.path.join(FIXTURES_DIR, "gemnet_oc_reference")
SHARED_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
PUBLIC_SAMPLES_ABSENT = ("real public data sample not beside this clone (../shared/data; its README asks that "
                         "the samples not be committed)")
# Skip reasons that blame a missing file; conftest.py fails such skips, test_skip_policy.py forbids them.
MISSING_FILE_REASON = re.compile(r"absent|not present|missing|no such file|not found|does not exist|fixture", re.I)


def _existing(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: fixture missing from the repository (tests/fixtures/README.md)")
    return path


def reference_path(name: str) -> str:
    """A file of the GemNet-OC reference fixture (made by the PyTorch JMP code)."""
    return _existing(os.path.join(REFERENCE_DIR, name))


def data_path(*parts: str) -> str:
    """A file or folder of the real public data samples in ../shared/data: skips the test where that is
    absent, fails it under CI."""
    path = os.path.join(SHARED_DATA_DIR, *parts)
    if os.path.exists(path) or os.environ.get("CI"):
        return _existing(path)
    pytest.skip(PUBLIC_SAMPLES_ABSENT)


def array_digest(array: np.ndarray) -> str:
    """sha256 of dtype, shape and bytes: stands in for an exact comparison with an array not stored here."""
    array = np.ascontiguousarray(array)
    return hashlib.sha256(f"{array.dtype.str}{array.shape}".encode() + array.tobytes()).hexdigest()


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [...] float -> (int16 [...], float32 scale []); |dequantize - x| <= max|x| / 65534."""
    scale = np.float32(np.abs(x).max() / 32767 or 1.0)
    return np.rint(x / scale).astype(np.int16), scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale


def load_grads() -> dict[str, np.ndarray]:
    """grads_sample.npz with the int16 float32 gradients decoded: `f32.loss`, `f64.loss`, `f32.grad.<key>`
    (within max|g| / 65534 of the reference) and `f64.grad.<key>` (float32-rounded)."""
    with np.load(reference_path("grads_sample.npz")) as npz:
        stored = {k: npz[k] for k in npz.files}
    out = {k: v for k, v in stored.items() if not k.endswith((".q", ".scale"))}
    out.update({k[:-2]: dequantize(v, stored[k[:-2] + ".scale"]) for k, v in stored.items() if k.endswith(".q")})
    return out
