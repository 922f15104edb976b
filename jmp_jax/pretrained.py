"""Inference with a converted or trained JMP checkpoint: energies, forces and per-layer atom embeddings.

    model = load_pretrained("jmp-s-orbax")           # converter output dir or training checkpoint dir
    out = model.predict([atoms_a, atoms_b], head="oc20")   # eV, eV/Å
    layers = model.embed([atoms_a])                   # per-atom features after every block

Graphs are rebuilt on the host per call with JMP's pre-training settings; batches are padded to bucketed
budgets so that calls with similar-size structures reuse one compiled function.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from jmp_jax.graph import batching, slots
from jmp_jax.graph.build import GraphSettings, StructureGraphs, build_from_atoms
from jmp_jax.graph.types import GraphBatch
from jmp_jax.graph.validate import MAX_ATOMIC_NUMBER
from jmp_jax.models.config import BackboneConfig
from jmp_jax.models.jmp import JMPModel
from jmp_jax.tasks import JMP_TASKS

FORCE_MODES = ("direct", "gradient")
KNOWN_ELEMENTS = len(chemical_symbols) - 1  # Z = 1..118: the elements ase (and the training data) know
PERIODIC_CUTOFF, MOLECULE_CUTOFF, DEFAULT_MAX_NEIGHBORS = 12.0, 8.0, 30


class PretrainedInputError(ValueError):
    """Bad arguments to a PretrainedModel (unknown head, empty input, unknown mode, ...)."""


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """One pre-training head: its normalisation and the settings it was trained with.

    energy_std (eV) and force_std (eV/Å) undo the target normalisation (mean 0). linear_reference:
    (MAX_ATOMIC_NUMBER + 1,) eV per element indexed by Z, or None; when set, the head predicts the
    referenced energy E - sum_i ref[Z_i] and `predict` adds the reference back.
    cutoff / max_neighbors: what the task was trained with (informational; see `PretrainedModel.predict`).
    """

    name: str
    energy_std: float
    force_std: float
    cutoff: float | None = None
    max_neighbors: int | None = None
    linear_reference: np.ndarray | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TaskInfo":
        """From a checkpoint's task entry; linear_reference may be a Z-indexed list or {str(Z): eV}."""
        ref = d.get("linear_reference")
        if ref is not None:
            items = ref.items() if isinstance(ref, Mapping) else enumerate(ref)
            table = np.zeros(MAX_ATOMIC_NUMBER + 1)
            for z, value in items:
                table[int(z)] = float(value)
            ref = table
        try:
            return cls(name=str(d["name"]), energy_std=float(d["energy_std"]), force_std=float(d["force_std"]),
                       cutoff=d.get("cutoff"), max_neighbors=d.get("max_neighbors"), linear_reference=ref)
        except (KeyError, TypeError) as err:
            raise PretrainedInputError(f"task entry {dict(d)!r} needs a name, energy_std and force_std") from err

    def reference_energy(self, atomic_numbers: np.ndarray) -> float:
        """sum_i ref[Z_i] in eV (0 without a linear reference)."""
        return 0.0 if self.linear_reference is None else float(self.linear_reference[atomic_numbers].sum())


def jmp_pretrain_tasks() -> list[TaskInfo]:
    """The four JMP pre-training heads in checkpoint order (oc20, oc22, ani1x, transition1x).

    The released checkpoints carry no linear references, so ani1x / transition1x energies come out
    referenced (relative to JMP's per-element fit), not as total energies.
    """
    # There `linear_reference` is only a flag (the coefficients come from the data); drop it.
    return [TaskInfo.from_dict(dict(t, linear_reference=None)) for t in JMP_TASKS]


def tasks_from_metadata(metadata: Mapping[str, Any]) -> list[TaskInfo]:
    """The heads described by a checkpoint's metadata; JMP's four tasks for a converted 4-head checkpoint."""
    num_tasks = int(metadata.get("num_tasks", 0))
    if metadata.get("tasks"):
        tasks = [TaskInfo.from_dict(t) for t in metadata["tasks"]]
    elif num_tasks == 4:
        tasks = jmp_pretrain_tasks()
    else:
        raise PretrainedInputError(
            f"checkpoint metadata describes no tasks for its {num_tasks} heads; pass tasks=[{{'name', "
            f"'energy_std', 'force_std'}}, ...] to load_pretrained")
    if len(tasks) != num_tasks:
        raise PretrainedInputError(f"metadata lists {len(tasks)} tasks for {num_tasks} heads")
    return tasks


def default_settings(atoms, cutoff: float | None, max_neighbors: int | None, pbc) -> GraphSettings:
    """JMP pre-training graph settings for one structure, with overrides.

    pbc None: periodic if any atoms.pbc flag is set. Periodic: full 3-D PBC and 12 Å (OC20/OC22);
    otherwise no PBC and 8 Å (ANI-1x/Transition-1x). max_neighbors defaults to 30 (caps 30/20/8/1000).
    pbc may be a bool or 3 flags; cutoff / max_neighbors replace the defaults.
    """
    flags = (bool(np.any(atoms.pbc)),) * 3 if pbc is None else tuple(bool(p) for p in np.broadcast_to(pbc, (3,)))
    periodic = any(flags)
    return GraphSettings(
        cutoff=float(cutoff) if cutoff is not None else (PERIODIC_CUTOFF if periodic else MOLECULE_CUTOFF),
        max_neighbors=int(max_neighbors) if max_neighbors is not None else DEFAULT_MAX_NEIGHBORS, pbc=flags)


def build_graphs(atoms_list, *, cutoff=None, max_neighbors=None, pbc=None,
                 settings: Callable[[Atoms], GraphSettings] | None = None) -> list[StructureGraphs]:
    """Per-structure graphs of an ase.Atoms or a sequence of them.

    settings: graph settings per structure; default `default_settings` with cutoff / max_neighbors / pbc.
    Errors name the structure by its list index.
    """
    atoms_list = [atoms_list] if isinstance(atoms_list, Atoms) else list(atoms_list)
    if not atoms_list:
        raise PretrainedInputError("atoms_list is empty: pass at least one ase.Atoms")
    bad = [i for i, a in enumerate(atoms_list) if not isinstance(a, Atoms)]
    if bad:
        raise PretrainedInputError(f"atoms_list[{bad[0]}] is a {type(atoms_list[bad[0]]).__name__}, not an ase.Atoms")
    for i, atoms in enumerate(atoms_list):
        unknown = np.flatnonzero((atoms.numbers < 1) | (atoms.numbers > KNOWN_ELEMENTS))
        if unknown.size:
            raise PretrainedInputError(f"atoms_list[{i}]: unknown element Z={atoms.numbers[unknown[0]]} at atom "
                                       f"{unknown[0]} (valid: 1..{KNOWN_ELEMENTS})")
    settings = settings or (lambda atoms: default_settings(atoms, cutoff, max_neighbors, pbc))
    return [build_from_atoms(atoms, settings(atoms), name=f"atoms_list[{i}] ({atoms.get_chemical_formula()})")
            for i, atoms in enumerate(atoms_list)]


def padded_batches(graphs: Sequence[StructureGraphs], batch_size: int, dtype,
                   slot_widths: dict[batching.Budgets, dict[str, int]] | None = None
                   ) -> Iterator[tuple[Sequence[StructureGraphs], GraphBatch]]:
    """(chunk, padded batch) per run of at most batch_size structures, budgets bucketed (few compiled shapes).

    slot_widths: the widest slot layout used so far per budget, kept by the caller across calls and updated
    here: a batch's slots are at least that wide. A structure moving by small steps (MD, relaxations) shifts
    its largest in-degrees up and down across a width step; without this each width visited is a new shape
    and a new compile (measured: 9 slot shapes in 40 frames of a 66-atom slab MD step at 12 Å).
    """
    if batch_size < 1:
        raise PretrainedInputError(f"batch_size must be >= 1, got {batch_size}")
    widths_seen = {} if slot_widths is None else slot_widths
    for start in range(0, len(graphs), batch_size):
        chunk = graphs[start:start + batch_size]
        budgets = batching.bucketed_budgets(chunk)
        batch = batching.collate(chunk, budgets, dtype=dtype, slot_widths=widths_seen.get(budgets))
        widths_seen[budgets] = slots.widths_of(batch)
        yield chunk, batch


def per_structure(per_atom: np.ndarray, chunk: Sequence[StructureGraphs]) -> list[np.ndarray]:
    """A padded per-atom array (N, ...) cut into the chunk's structures [(n_i, ...)]."""
    ends = np.cumsum([sg.num_atoms for sg in chunk])
    return [per_atom[end - sg.num_atoms:end] for sg, end in zip(chunk, ends)]


class CheckpointModel:
    """What a pre-trained and a fine-tuned model share: weights, a Flax module and the compute dtype.

    Attributes: path (the checkpoint read, or None), config (BackboneConfig), variables ({"params",
    "constants"}), metadata (the checkpoint's JSON), dtype (compute dtype; float64 needs `jax.enable_x64`),
    num_compiles (how many times the forward has been traced = compiled, for checking shape reuse),
    slot_widths (the widest slot layout per padded budget so far: later calls reuse it, see `padded_batches`).
    """

    def __init__(self, config: BackboneConfig, variables: Mapping[str, Any], metadata: Mapping[str, Any] | None,
                 dtype, path: str | None):
        self.config, self.dtype, self.path = config, jnp.dtype(dtype), path
        self.variables = dict(variables)
        if self.dtype == jnp.float64:
            # Float32 weights would pull parts of a float64 forward (e.g. concatenations with h) back to float32.
            self.variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), self.variables)
        self.metadata = dict(metadata or {})
        self.num_compiles = 0
        self.slot_widths: dict[batching.Budgets, dict[str, int]] = {}

    @property
    def float_dtype(self):
        """Host dtype of the batches' coordinates."""
        return np.float64 if self.dtype == jnp.float64 else np.float32


class PretrainedModel(CheckpointModel):
    """A JMP model with weights, pre-training task heads and a compiled forward (see `CheckpointModel`).

    tasks: list[TaskInfo], one per head.
    """

    def __init__(self, config: BackboneConfig, variables: Mapping[str, Any], tasks: Sequence[TaskInfo],
                 metadata: Mapping[str, Any] | None = None, dtype=jnp.float32, path: str | None = None):
        if not tasks:
            raise PretrainedInputError("a PretrainedModel needs at least one task head")
        super().__init__(config, variables, metadata, dtype, path)
        self.tasks = list(tasks)
        self.module = JMPModel(config, num_tasks=len(self.tasks), dtype=self.dtype)
        self._forward = jax.jit(self._forward_impl, static_argnames=("task", "mode"))

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def embedding_keys(self) -> list[str]:
        """Layer names of `embed`, input to output: h_embedding, h_block0 .. h_block{num_blocks-1}, energy_features."""
        return ["h_embedding"] + [f"h_block{k}" for k in range(self.config.num_blocks)] + ["energy_features"]

    def head_index(self, head: int | str) -> int:
        """Index of a head given by index or task name; PretrainedInputError naming the tasks otherwise."""
        names = self.task_names
        if isinstance(head, str) and head in names:
            return names.index(head)
        if isinstance(head, (int, np.integer)) and not isinstance(head, bool) and 0 <= head < len(names):
            return int(head)
        available = ", ".join(f"{i}={n!r}" for i, n in enumerate(names))
        raise PretrainedInputError(f"unknown head {head!r}; available heads: {available}")

    def _forward_impl(self, variables, batch: GraphBatch, *, task: int, mode: str) -> dict[str, jax.Array]:
        """Padded outputs in normalised units. mode: "direct" | "gradient" (forces = -dE/dpos) | "embed"."""
        self.num_compiles += 1  # runs only while tracing, i.e. once per compiled shape
        apply = self.module.apply
        if mode == "gradient":
            def total_energy(positions):
                nodes = dict(batch.graph.nodes, positions=positions)
                out = apply(variables, batch.replace(graph=batch.graph._replace(nodes=nodes)), task=task)
                # Structures are independent, so the gradient of the sum is each structure's gradient.
                return jnp.sum(out["energy"]), out["energy"]
            grad, energy = jax.grad(total_energy, has_aux=True)(batch.graph.nodes["positions"])
            return {"energy": energy, "forces": -grad}
        if mode == "embed":
            out, state = apply(variables, batch, task=task, mutable=["intermediates"])
            sown = state["intermediates"]
            layers = {"h_embedding": sown["h_embedding"][0]}
            layers.update({f"h_block{k}": sown["backbone"][f"h_block{k}"][0] for k in range(self.config.num_blocks)})
            layers["energy_features"] = out["energy_features"]
            return layers
        out = apply(variables, batch, task=task)
        return {"energy": out["energy"], "forces": out["forces"]}

    def force_mode(self, forces: str | None) -> str:
        """The force mode asked for: "direct" (default, as pre-trained) or "gradient"."""
        if forces is None:
            return "direct"
        if forces not in FORCE_MODES:
            raise PretrainedInputError(f"forces must be one of {FORCE_MODES}, got {forces!r}")
        return forces

    def _run(self, graphs: Sequence[StructureGraphs], task: int, mode: str, batch_size: int):
        """Yields (chunk of graphs, padded numpy outputs) per batch of at most batch_size structures."""
        for chunk, batch in padded_batches(graphs, batch_size, self.float_dtype, self.slot_widths):
            yield chunk, jax.tree.map(np.asarray, self._forward(self.variables, batch, task=task, mode=mode))

    def predict(self, atoms_list, head: int | str = 0, *, forces: str | None = None, cutoff: float | None = None,
                max_neighbors: int | None = None, pbc=None, batch_size: int = 16) -> dict[str, Any]:
        """Energies and forces of structures with one task head.

        atoms_list: ase.Atoms or a sequence of them (B structures). head: index or task name.
        forces: "direct" (default: the head's force MLP, what JMP pre-trains) or "gradient" (-dE/dpos,
          conservative).
        cutoff / max_neighbors / pbc: graph overrides (see `default_settings`).
        batch_size: structures per padded batch (each batch's budgets are bucketed, see `batching.bucketed_budgets`).
        Tags: an Atoms' tags array is read as OC20 tags (0 sub-surface, 1 surface, 2 adsorbate; quadruplet
        edges must touch a 1 or 2); without one every atom gets 2. ase.build slabs store layer numbers in
        their tags: reset them (atoms.set_tags(2)) unless they follow OC20's convention.
        Returns {"energy": (B,) float64 eV, "forces": list of B (n_i, 3) float64 eV/Å}: head outputs times
        the task's energy_std / force_std (gradient forces: energy_std), plus the linear reference energy.
        """
        forces = self.force_mode(forces)
        task_index = self.head_index(head)
        task = self.tasks[task_index]
        graphs = build_graphs(atoms_list, cutoff=cutoff, max_neighbors=max_neighbors, pbc=pbc)
        force_scale = task.force_std if forces == "direct" else task.energy_std
        energies, force_list = [], []
        for chunk, out in self._run(graphs, task_index, forces, batch_size):
            energies += [float(out["energy"][i]) * task.energy_std + task.reference_energy(sg.atomic_numbers)
                         for i, sg in enumerate(chunk)]
            force_list += [f.astype(np.float64) * force_scale for f in per_structure(out["forces"], chunk)]
        energy = np.asarray(energies)
        if not (np.all(np.isfinite(energy)) and all(np.all(np.isfinite(f)) for f in force_list)):
            warnings.warn("JMP predicted non-finite energies or forces", RuntimeWarning, stacklevel=2)
        return {"energy": energy, "forces": force_list}

    def embed(self, atoms_list, *, cutoff: float | None = None, max_neighbors: int | None = None, pbc=None,
              batch_size: int = 16) -> list[dict[str, np.ndarray]]:
        """Per-layer atom embeddings of every structure (backbone only; no head is involved).

        Returns one dict per structure, each value (n_i, emb_size_atom) numpy in the compute dtype:
          "h_embedding"      the atom-type embedding fed to the backbone,
          "h_block{k}"       the atom embedding h after interaction block k, k = 0 .. num_blocks - 1,
          "energy_features"  the backbone's final per-atom features (input of the energy heads).
        """
        graphs = build_graphs(atoms_list, cutoff=cutoff, max_neighbors=max_neighbors, pbc=pbc)
        result = []
        for chunk, layers in self._run(graphs, 0, "embed", batch_size):
            cut = {k: per_structure(layers[k], chunk) for k in self.embedding_keys}
            result += [{k: cut[k][i] for k in self.embedding_keys} for i in range(len(chunk))]
        return result


class FinetunedModel(CheckpointModel):
    """A fine-tuned checkpoint (`experiments.finetune`): the backbone and its one task head.

    Graphs are built with the task's own settings and the outputs de-normalised with the statistics it was
    trained with (both stored under the metadata key "finetune"), so `predict` gives what the fine-tuning
    evaluation scores. Attributes (besides `CheckpointModel`'s): task (the task config as stored: name, kind,
    target, cutoff, ...), spec (finetune.model.HeadSpec), normalization (dict), data_spec (finetune.data.DataSpec).
    """

    def __init__(self, config: BackboneConfig, variables: Mapping[str, Any], metadata: Mapping[str, Any],
                 dtype=jnp.float32, path: str | None = None):
        from jmp_jax.finetune.model import FinetuneModel
        super().__init__(config, variables, metadata, dtype, path)
        self.task, self.spec, self.data_spec = finetune_task(self.metadata, path)
        self.normalization = dict(self.metadata["finetune"]["normalization"])
        self.module = FinetuneModel(config, self.spec, dtype=self.dtype)
        self._forward = jax.jit(self._forward_impl)

    @property
    def task_names(self) -> list[str]:
        return [self.task["name"]]

    @property
    def target(self) -> str | None:
        """The scalar target's name (key of `predict`'s output), None for force and classification tasks."""
        return self.task.get("target") if self.spec.kind == "scalar" else None

    @property
    def gives_energy(self) -> bool:
        """Gradient-force heads predict an energy whose gradient gives the forces (up to a constant offset)."""
        return self.spec.kind == "forces" and self.spec.gradient_forces

    def _where(self) -> str:
        return f"{self.path or 'fine-tuned checkpoint'} (task {self.task['name']!r}, a {self.spec.kind} head)"

    def head_index(self, head: int | str) -> int:
        """0: the checkpoint's one head, given as 0 or by its task name."""
        if head in (0, self.task["name"]) and not isinstance(head, bool):
            return 0
        raise PretrainedInputError(f"unknown head {head!r}; {self._where()} has one head: 0={self.task['name']!r}")

    def force_mode(self, forces: str | None) -> str:
        """The mode the head was trained with ("gradient" or "direct"); asking for the other is an error."""
        if self.spec.kind != "forces":
            raise PretrainedInputError(f"{self._where()} predicts no forces (metadata key finetune.task.kind)")
        own = "gradient" if self.spec.gradient_forces else "direct"
        if forces not in (None, own):
            raise PretrainedInputError(f"{self._where()} was fine-tuned with {own} forces (metadata key "
                                       f"finetune.task.gradient_forces); forces={forces!r} does not apply")
        return own

    def _forward_impl(self, variables, batch: GraphBatch) -> dict[str, jax.Array]:
        from jmp_jax.finetune.model import predict
        self.num_compiles += 1  # runs only while tracing, i.e. once per compiled shape
        return predict(self.module, variables, batch)

    def predict(self, atoms_list, head: int | str = 0, *, forces: str | None = None, batch_size: int = 16
                ) -> dict[str, Any]:
        """The task head's predictions for structures (ase.Atoms or a sequence of B), in physical units.

        Returns by the head's kind:
          scalar:          {target name: (B,) float64}, e.g. {"U_0": ...} (the task's units, as in its records),
          classification:  {"logits": (B, C) float64},
          forces:          {"forces": list of B (n_i, 3) float64 eV/Å} and, for gradient-force heads,
                           "energy": (B,) eV whose gradient the forces are, up to a constant offset per system
                           (forces-only training leaves the offset free).
        forces: None or the head's own mode (see `force_mode`). Graph settings are the task's (its cutoff,
        neighbour caps and PBC); atoms tags as in `PretrainedModel.predict`.
        """
        self.head_index(head)
        if forces is not None:
            self.force_mode(forces)
        graphs = build_graphs(atoms_list, settings=lambda atoms: self.data_spec.settings(len(atoms)))
        parts: dict[str, list] = {}
        for chunk, batch in padded_batches(graphs, batch_size, self.float_dtype, self.slot_widths):
            out = jax.tree.map(lambda x: np.asarray(x, np.float64), self._forward(self.variables, batch))
            for key, value in self._physical(out, chunk).items():
                parts.setdefault(key, []).extend(value)
        return {key: value if key == "forces" else np.asarray(value) for key, value in parts.items()}

    def _physical(self, out: dict[str, np.ndarray], chunk: Sequence[StructureGraphs]) -> dict[str, list]:
        """One padded batch's outputs in physical units, per structure."""
        n, norm = len(chunk), self.normalization
        if self.spec.kind == "scalar":
            return {self.target: list(out["scalar"][:n] * norm["target_std"] + norm["target_mean"])}
        if self.spec.kind == "classification":
            return {"logits": list(out["logits"][:n])}
        result = {"forces": [f * norm["force_std"] for f in per_structure(out["forces"], chunk)]}
        if self.gives_energy:
            result["energy"] = list(out["energy"][:n] * norm["force_std"])
        return result


def finetune_task(metadata: Mapping[str, Any], path: str | None):
    """(task dict, HeadSpec, DataSpec) of a fine-tuning checkpoint's metadata key "finetune"."""
    import ml_collections

    from jmp_jax.finetune.data import DataSpec
    from jmp_jax.finetune.loop import head_spec
    task = dict(metadata["finetune"].get("task") or {})
    try:
        spec = head_spec(ml_collections.ConfigDict(task))
        data_spec = DataSpec(source=task["source"], cutoff=task["cutoff"], max_neighbors=task["max_neighbors"],
                             pbc=task["pbc"], batch_size=1,
                             conditional_max_neighbors=task.get("conditional_max_neighbors", False))
    except (KeyError, AttributeError, ValueError) as err:
        raise PretrainedInputError(f"{path}: metadata key finetune.task is incomplete or invalid: {err}") from err
    return task, spec, data_spec


def _config_from_metadata(metadata: Mapping[str, Any], path: str) -> BackboneConfig:
    """Converter outputs store the backbone as "config", training checkpoints as "backbone"."""
    fields = metadata.get("config") or metadata.get("backbone")
    if not fields:
        raise PretrainedInputError(f"{path}: checkpoint metadata has no backbone config ('config' / 'backbone')")
    return BackboneConfig.from_jmp_dict(fields)


def checkpoint_root(path: str | os.PathLike) -> str:
    """The checkpoint directory of a path: a fine-tuning workdir's best/ (its checkpoints/ hold the resumable
    run state), a pre-training workdir's checkpoints/, else the path itself (a converter output, a checkpoints
    dir or a step dir)."""
    path = os.fspath(path)
    for inner in ("best", "checkpoints"):
        if os.path.isdir(os.path.join(path, inner)):
            return os.path.join(path, inner)
    return path


def load_pretrained(path: str | os.PathLike, *, ema: bool = True, tasks: Sequence[Mapping[str, Any]] | None = None,
                    dtype=jnp.float32) -> PretrainedModel | FinetunedModel:
    """Loads a converter output directory, a pre-training run workdir or its checkpoints (latest step), a
    fine-tuning run workdir (its best checkpoint), or a step directory of any of them.

    A fine-tuning checkpoint (metadata key "finetune") gives a `FinetunedModel` with its own task head; every
    other a `PretrainedModel`.
    ema: use the EMA weights when the checkpoint has them (pre-training checkpoints).
    tasks: per-head {"name", "energy_std", "force_std", ["linear_reference"]} overriding the metadata's;
      needed for pre-trained checkpoints whose metadata describes no tasks (except JMP's own 4-head ones).
    dtype: compute dtype (jnp.float64 needs `jax.enable_x64`).
    """
    if tasks is not None and (isinstance(tasks, (str, bytes, Mapping)) or not isinstance(tasks, Sequence)
                              or not all(isinstance(t, Mapping) for t in tasks)):
        raise PretrainedInputError(f"tasks must be a list of dicts, one per head ({{'name', 'energy_std', "
                                   f"'force_std'}}), got {type(tasks).__name__} {str(tasks)[:80]}")
    from jmp_jax.checkpoint import orbax_io  # orbax is heavy; only loading needs it
    path = checkpoint_root(path)
    if jnp.dtype(dtype) == jnp.float64 and not jax.config.jax_enable_x64:
        raise PretrainedInputError("dtype=float64 needs jax x64 (wrap the calls in `with jax.enable_x64(True):`)")
    metadata = orbax_io.read_metadata(path)
    if "finetune" in metadata:
        if tasks is not None:
            raise PretrainedInputError(f"{path}: tasks= is for pre-trained checkpoints; this one is fine-tuned "
                                       f"(metadata key 'finetune') and carries its own task")
        return _load_finetuned(path, metadata, dtype)
    variables, metadata = orbax_io.load_variables(path, use_ema=ema)
    config = _config_from_metadata(metadata, path)
    if tasks is not None:
        metadata = dict(metadata, tasks=[dict(t) for t in tasks])
    return PretrainedModel(config, variables, tasks_from_metadata(metadata), metadata, dtype=dtype, path=path)


def _load_finetuned(path: str, metadata: Mapping[str, Any], dtype) -> FinetunedModel:
    """The fine-tuned model its metadata describes, its stored tree checked against that model's before reading."""
    from jmp_jax.checkpoint import orbax_io
    from jmp_jax.cli import one_line
    from jmp_jax.finetune.model import FinetuneModel, backbone_for
    from jmp_jax.models.jmp import placeholder_batch
    _, spec, _ = finetune_task(metadata, path)
    config = backbone_for(_config_from_metadata(metadata, path), spec)
    module = FinetuneModel(config, spec)
    expected = jax.eval_shape(lambda: module.init(jax.random.key(0), placeholder_batch()))
    try:
        variables, metadata = orbax_io.load_variables(path, use_ema=False, target=expected)
    except orbax_io.CheckpointMismatchError as err:
        raise PretrainedInputError(f"{path}: weights do not match the model of its metadata (keys 'config', "
                                   f"'finetune.task'): {one_line(err)}") from err
    return FinetunedModel(config, variables, metadata, dtype=dtype, path=path)
