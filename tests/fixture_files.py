"""Test utility: paths of the fixture files kept in the repository (tests/fixtures, see its README.md),
among them trimmed real public data samples, and the decoding of the arrays stored there compactly.

A missing fixture is an error, never a skip: the suite has to check what it claims on any clone.
"""
from __future__ import annotations

import hashlib
import os
import re

import numpy as np

FIXTURES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
REFERENCE_DIR = os.path.join(FIXTURES_DIR, "gemnet_oc_reference")
PUBLIC_DATA_DIR = os.path.join(FIXTURES_DIR, "public_data")
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
    """A file or folder of the real public data samples (tests/fixtures/public_data)."""
    return _existing(os.path.join(PUBLIC_DATA_DIR, *parts))


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
