"""jmp_jax: JAX/Flax reimplementation of JMP (Joint Multi-domain Pre-training)."""
from setuptools import find_packages, setup

# Pinned to the set seen to install together and pass the test suite on Python 3.11.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "jraph==0.0.6.dev0",
    "e3nn-jax==0.21.0",
    "ml-collections==1.1.0",
    "ase==3.29.0",
    "numpy==2.4.6",
    "vesin==0.6.2",
    "absl-py==2.5.1",
    "tensorflow-cpu==2.21.0",
    "tensorflow-datasets==4.9.10",
    "tensorboard==2.21.0",
    # jmp_jax.data.example_proto builds the record messages with it. Below the newest (7.x) because every Apache
    # Beam release needs protobuf < 7 (the beam extra); tensorflow 2.21 accepts >= 6.31.1.
    "protobuf==6.33.6",
    "h5py==3.14.0",
    "qm9pack==1.0.3",
    "tblite==0.8.0",
    "ml-dtypes==0.6.0",
    "scikit-learn==1.9.1",
    "matplotlib==3.11.2",
]

# Apache Beam for the distributed data_prep build (data_prep/beam_build.py). Beam 2.77 needs pyarrow < 26,
# pillow < 13 and python-dateutil < 3, so with it these resolve below the newest versions a plain install picks
# (pyarrow 26.0.1, pillow 13.0.0, python-dateutil 4.0.0). Pinned to the set that pip resolves with the pins above.
BEAM = ["apache-beam==2.77.0", "pyarrow==25.0.1", "pillow==12.3.0", "python-dateutil==2.9.0.post0"]

setup(
    name="jmp_jax",
    version="0.1.0",
    description="JAX/Flax GemNet-OC and JMP multi-domain pre-training",
    # The library only: the tools (experiments/, data_prep/, configs/) run from a checkout, `python -m ...` in
    # its root, and generic top-level names such as `configs` would shadow other installed packages.
    packages=find_packages(include=["jmp_jax", "jmp_jax.*"]),
    package_data={"jmp_jax.checkpoint": ["*.json"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # nbclient .. matplotlib: tests/test_documented_paths.py executes notebooks/*.ipynb. torch, lmdb and
        # torch_geometric let the tests run the optional paths (the .pt reader's cross-check against torch,
        # the OCP LMDB reader); the package itself never needs them. pytest-xdist runs the test files on
        # two processes: the suite is mostly single-threaded XLA compiles. ruff: tests/test_lint.py (ruff.toml).
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "execnet==2.1.2", "nbclient==0.11.0",
                 "nbformat==5.11.1", "ipykernel==7.4.0", "matplotlib==3.11.2", "torch==2.13.0", "lmdb==3.0.0",
                 "torch_geometric==2.8.1", "ruff==0.17.6", *BEAM],
        # NVIDIA GPUs: the CUDA 12 plugin (with its CUDA libraries from pip) at the pinned jax version.
        "cuda12": ["jax[cuda12]==0.10.2"],
        # data_prep.build --workers N / --runner NAME (data_prep/beam_build.py).
        "beam": BEAM,
        # Only to cross-check the numpy .pt reader against torch; the converter itself never needs torch.
        "torch": ["torch==2.13.0"],
        # Only for OC20/OC22 input given as the OCP code's LMDBs of pickled torch_geometric graphs.
        "ocp-lmdb": ["lmdb==3.0.0", "torch==2.13.0", "torch_geometric==2.8.1"],
    },
)
