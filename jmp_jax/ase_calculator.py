"""An ase Calculator backed by a JMP checkpoint (one task head).

Graphs are rebuilt from the atoms on every call (atoms move between steps); the padded batch is sized
by bucketed budgets, so an MD run or a relaxation reuses a handful of compiled shapes.
"""
from __future__ import annotations

import os

from ase.calculators.calculator import Calculator, all_changes

from jmp_jax.pretrained import PretrainedModel, load_pretrained


class JMPCalculator(Calculator):
    """Energy (eV) and forces (eV/Å) of a JMP head; free_energy = energy.

    model_or_path: a PretrainedModel or a checkpoint directory for `load_pretrained` (EMA weights).
    head: task index or name. forces: "direct" (the head's force MLP, as pre-trained; not the gradient of
    the energy) or "gradient" (-dE/dpos through the model, energy-conserving: use it for MD / relaxations).
    cutoff / max_neighbors / pbc: graph overrides (default: JMP's pre-training settings, see
    `jmp_jax.pretrained.default_settings`).
    Energies jump slightly where the nearest-neighbour caps change the graph between steps, as in JMP.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, model_or_path: PretrainedModel | str | os.PathLike, head: int | str = 0, *,
                 forces: str = "direct", cutoff: float | None = None, max_neighbors: int | None = None,
                 pbc=None, **calculator_kwargs):
        super().__init__(**calculator_kwargs)
        model = model_or_path if isinstance(model_or_path, PretrainedModel) else load_pretrained(model_or_path)
        self.model = model
        self.head = model.head_index(head)
        if forces not in ("direct", "gradient"):
            raise ValueError(f"forces must be 'direct' or 'gradient', got {forces!r}")
        self.force_mode = forces
        self.graph_overrides = {"cutoff": cutoff, "max_neighbors": max_neighbors, "pbc": pbc}

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        out = self.model.predict([self.atoms], self.head, forces=self.force_mode, batch_size=1,
                                 **self.graph_overrides)
        energy = float(out["energy"][0])
        self.results = {"energy": energy, "free_energy": energy, "forces": out["forces"][0]}
