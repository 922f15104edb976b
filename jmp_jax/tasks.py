"""JMP's pre-training task table and the embedded default dataset's (docs/jmp_spec.md §3.2), as plain data.

The configs build runs from these; `pretrained` names the heads of a converted JMP checkpoint from them.
"""
from __future__ import annotations

# The four JMP source domains (docs/jmp_spec.md §3.2): graph settings, normalisation (std; mean 0) and loss weights.
# energy_kind: the energy JMP's std is for, which the prepared splits must hold (metadata "energy_kind"):
# OC20 S2EF energies referenced to each system's clean slab + gas-phase reference, as its LMDBs hold them;
# OC22 and the molecules total (the molecules' per-element linear reference is subtracted at load time).
JMP_TASKS = (
    dict(name="oc20", source="oc20", cutoff=12.0, max_neighbors=30, pbc=True, linear_reference=False,
         energy_std=24.901469505465872, force_std=0.5111534595489502, energy_coefficient=1.0, force_coefficient=73.0,
         energy_kind="referenced"),
    dict(name="oc22", source="oc22", cutoff=12.0, max_neighbors=30, pbc=True, linear_reference=False,
         energy_std=25.229595396538468, force_std=0.25678861141204834, energy_coefficient=1.0, force_coefficient=80.0,
         energy_kind="total"),
    dict(name="ani1x", source="ani1x", cutoff=8.0, max_neighbors=30, pbc=False, linear_reference=True,
         energy_std=2.8700712783472118, force_std=2.131422996520996, energy_coefficient=1.0, force_coefficient=15.0,
         energy_kind="total"),
    dict(name="transition1x", source="transition1x", cutoff=8.0, max_neighbors=30, pbc=False, linear_reference=True,
         energy_std=1.787466168382901, force_std=0.3591422140598297, energy_coefficient=1.0, force_coefficient=14.0,
         energy_kind="total"),
)

# The embedded default dataset (built offline on first use, no download): one task per domain, each
# shaped like the JMP domain it stands in for. energy_std / force_std None = taken from the shard metadata.
DEFAULT_TASKS = (
    dict(name="catalysis", source="catalysis", cutoff=12.0, max_neighbors=30, pbc=True, linear_reference=True,
         energy_std=None, force_std=None, energy_coefficient=1.0, force_coefficient=73.0),
    dict(name="molecules", source="molecules", cutoff=8.0, max_neighbors=30, pbc=False, linear_reference=True,
         energy_std=None, force_std=None, energy_coefficient=1.0, force_coefficient=15.0),
    dict(name="reactions", source="reactions", cutoff=8.0, max_neighbors=30, pbc=False, linear_reference=True,
         energy_std=None, force_std=None, energy_coefficient=1.0, force_coefficient=14.0),
)
