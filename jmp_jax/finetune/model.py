"""The fine-tuning model: JMP's atom embedding + GemNet-OC backbone + one new task head (docs/jmp_spec.md §1.7, §4).

Param tree: `embedding/...` and `backbone/...` exactly as in the pre-training `JMPModel` (so pre-trained
weights copy over by path), plus `head/...` (scalar, classification, spatial extent) or
`energy_head/...` [+ `force_head/...` for direct forces]. The backbone's direct-force branch exists only
for direct-force tasks (`BackboneConfig.direct_forces`), as in JMP.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmp_jax.finetune import heads
from jmp_jax.graph.types import GraphBatch
from jmp_jax.models.config import BackboneConfig
from jmp_jax.models.gemnet import BlockExecution, GemNetOCBackbone
from jmp_jax.models.jmp import AtomEmbedding

KINDS = ("scalar", "classification", "forces")


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """What the model predicts.

    kind: "scalar" (one value per graph), "classification" (C logits per graph) or "forces"
      (energy + forces; only the forces are trained, JMP's model_type="forces").
    head: "mlp" or "spatial_extent" (QM9 R², scalar only).
    gradient_forces: F = -dE/dpos (rMD17, MD22 mostly, SPICE) instead of the direct-force head.
    """

    kind: str
    head: str = "mlp"
    reduction: str = "sum"
    num_classes: int = 0
    dropout: float = 0.0
    gradient_forces: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"head kind {self.kind!r} is not one of {KINDS}")
        if self.head not in ("mlp", "spatial_extent"):
            raise ValueError(f"head {self.head!r} must be 'mlp' or 'spatial_extent'")
        if self.head == "spatial_extent" and (self.kind != "scalar" or self.reduction != "sum"):
            raise ValueError("the spatial-extent head is a scalar head with sum reduction")
        if self.kind == "classification" and self.num_classes < 2:
            raise ValueError(f"classification needs num_classes >= 2, got {self.num_classes}")
        if self.reduction not in heads.REDUCTIONS:
            raise ValueError(f"reduction {self.reduction!r} is not one of {heads.REDUCTIONS}")

    @property
    def direct_forces(self) -> bool:
        """Whether the backbone keeps its direct-force branch."""
        return self.kind == "forces" and not self.gradient_forces


def backbone_for(config: BackboneConfig, head: HeadSpec) -> BackboneConfig:
    """The backbone config a task uses: direct-force branch only for direct-force heads, no edge dropout."""
    return dataclasses.replace(config, direct_forces=head.direct_forces, edge_dropout=None)


class FinetuneModel(nn.Module):
    """(batch, train) -> {"scalar": (G,)} | {"logits": (G, C)} | {"energy": (G,)[, "forces": (N, 3)]}.

    Values of padding graphs / atoms are 0. Outputs are in normalised units (see finetune.loss).
    Gradient forces are not computed here: use `predict`.
    """

    config: BackboneConfig
    head: HeadSpec
    dtype: Any = jnp.float32
    execution: BlockExecution = BlockExecution()

    @nn.compact
    def __call__(self, batch: GraphBatch, train: bool = False) -> dict[str, jax.Array]:
        if self.config.direct_forces != self.head.direct_forces:
            raise ValueError(f"backbone direct_forces={self.config.direct_forces} but the {self.head.kind} head "
                             f"needs {self.head.direct_forces}; build the config with backbone_for()")
        h = AtomEmbedding(self.config.num_elements, self.config.emb_size_atom, name="embedding")(
            batch.graph.nodes["atomic_numbers"])
        out = GemNetOCBackbone(self.config, self.dtype, self.execution, name="backbone")(h, batch, train)
        spec, graph_mask = self.head, batch.graph.globals["mask"]
        if spec.kind == "scalar":
            if spec.head == "spatial_extent":
                value = heads.SpatialExtentHead(self.dtype, name="head")(out.energy_features, batch)
            else:
                value = heads.ScalarHead(spec.reduction, dtype=self.dtype, name="head")(out.energy_features, batch)
            return {"scalar": jnp.where(graph_mask, value, 0.0)}
        if spec.kind == "classification":
            logits = heads.ClassificationHead(spec.num_classes, spec.dropout, spec.reduction, self.dtype,
                                              name="head")(out.energy_features, batch, train)
            return {"logits": jnp.where(graph_mask[:, None], logits, 0.0)}
        # JMP's fine-tuning energy head is bias-free throughout, summed over atoms.
        energy = heads.ScalarHead("sum", hidden_bias=False, dtype=self.dtype, name="energy_head")(
            out.energy_features, batch)
        result = {"energy": jnp.where(graph_mask, energy, 0.0)}
        if spec.direct_forces:
            forces = heads.DirectForceHead(self.dtype, name="force_head")(out.force_features, out.V_st, batch)
            result["forces"] = jnp.where(batch.graph.nodes["mask"][:, None], forces, 0.0)
        return result


def with_positions(batch: GraphBatch, positions: jax.Array) -> GraphBatch:
    """The batch with new atom positions (geometry is recomputed from them inside the model)."""
    nodes = dict(batch.graph.nodes, positions=positions)
    return batch.replace(graph=batch.graph._replace(nodes=nodes))


def predict(model: FinetuneModel, variables: dict, batch: GraphBatch, *, train: bool = False,
            rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """Model outputs, with gradient forces F = -dE/dpos (normalised units) added for gradient-force heads.

    rng: dropout key, needed when training a head with dropout.
    """
    rngs = {"dropout": rng} if rng is not None else {}
    spec = model.head
    if not (spec.kind == "forces" and spec.gradient_forces):
        return model.apply(variables, batch, train=train, rngs=rngs)

    def total_energy(positions):
        out = model.apply(variables, with_positions(batch, positions), train=train, rngs=rngs)
        return out["energy"].sum(), out

    grad, out = jax.grad(total_energy, has_aux=True)(batch.graph.nodes["positions"])
    forces = jnp.where(batch.graph.nodes["mask"][:, None], -grad, 0.0)
    return dict(out, forces=forces.astype(out["energy"].dtype))
