"""An ase Calculator backed by a JMP checkpoint: a pre-training head, or a fine-tuned force head.

Graphs are rebuilt from the atoms on every call (atoms move between steps); the padded batch is sized
by bucketed budgets, so an MD run or a relaxation reuses a handful of compiled shapes.
"""
from __future__ import annotations

import os

from ase.calculators.calculator import Calculator, all_changes

from jmp_jax.pretrained import CheckpointModel, FinetunedModel, PretrainedInputError, load_pretrained


class JMPCalculator(Calculator):
    """Energy (eV) and forces (eV/Å) of a JMP head; free_energy = energy.

    model_or_path: a PretrainedModel / FinetunedModel or a checkpoint path for `load_pretrained` (EMA weights).
    head: task index or name. forces: "direct" (the head's force MLP, as pre-trained; not the gradient of
    the energy) or "gradient" (-dE/dpos through the model, energy-conserving: use it for MD / relaxations);
    None: "direct" for pre-trained heads, the mode a fine-tuned head was trained with.
    cutoff / max_neighbors / pbc: graph overrides for pre-trained heads (default: JMP's pre-training settings,
    see `jmp_jax.pretrained.default_settings`); a fine-tuned head uses its task's own settings.
    A fine-tuned force head (rMD17, MD22, ...) gives forces and, with gradient forces, the energy they derive
    from (up to a constant); a fine-tuned scalar or classification head (QM9, MatBench) is refused.
    Energies jump slightly where the nearest-neighbour caps change the graph between steps, as in JMP.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, model_or_path: CheckpointModel | str | os.PathLike, head: int | str = 0, *,
                 forces: str | None = None, cutoff: float | None = None, max_neighbors: int | None = None,
                 pbc=None, **calculator_kwargs):
        super().__init__(**calculator_kwargs)
        model = model_or_path if isinstance(model_or_path, CheckpointModel) else load_pretrained(model_or_path)
        self.model = model
        self.head = model.head_index(head)
        self.force_mode = model.force_mode(forces)
        overrides = {"cutoff": cutoff, "max_neighbors": max_neighbors, "pbc": pbc}
        if isinstance(model, FinetunedModel):
            given = [name for name, value in overrides.items() if value is not None]
            if given:
                raise PretrainedInputError(f"{model.path}: a fine-tuned head builds graphs with its task's settings "
                                           f"(metadata key finetune.task); {', '.join(given)} cannot be overridden")
            overrides = {}
            if not model.gives_energy:
                self.implemented_properties = ["forces"]
        self.graph_overrides = overrides

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        out = self.model.predict([self.atoms], self.head, forces=self.force_mode, batch_size=1,
                                 **self.graph_overrides)
        self.results = {"forces": out["forces"][0]}
        if "energy" in out:
            energy = float(out["energy"][0])
            self.results.update(energy=energy, free_energy=energy)
