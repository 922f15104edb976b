"""JMP Lightning checkpoints (`jmp-s.pt`, `jmp-l.pt`): state dict, EMA weights and backbone config.

Layout (docs/jmp_spec.md §5): `state_dict` {torch key: tensor}, `optimizer_states[0]["ema"]` (a tuple of EMA tensors
in `model.parameters()` order) and `hyper_parameters` (the pickled JMP config). An `.npz` whose array
names are torch keys is accepted in place of a `.pt` (raw weights only).
"""
from __future__ import annotations

import dataclasses
import os
import re
import zipfile
from typing import Any, Mapping

import numpy as np

from jmp_jax.checkpoint import torch_pickle
from jmp_jax.models.config import BackboneConfig


class LightningCheckpointError(ValueError):
    """The checkpoint lacks something the converter needs, or its parts disagree."""


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a Lightning `.pt` (numpy arrays for tensors) or an `.npz` state dict ({"state_dict": ...})."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {"state_dict": {k: npz[k] for k in npz.files}}
        except (ValueError, zipfile.BadZipFile, EOFError) as err:
            raise LightningCheckpointError(f"{path}: unreadable .npz state dict ({err})") from None
    ckpt = torch_pickle.load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise LightningCheckpointError(f"{path}: no 'state_dict' in the checkpoint (found {keys})")
    return ckpt


def state_dict(ckpt: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The flat {torch key: array} state dict, in the checkpoint's order."""
    sd = ckpt["state_dict"]
    bad = [k for k, v in sd.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise LightningCheckpointError(f"state_dict entries that are not tensors: {bad[:10]}")
    return dict(sd)


def is_ema_skipped(key: str) -> bool:
    """True for state-dict keys with no entry in the EMA tuple: buffers, the seq_energy_pre alias, metrics."""
    return (key.endswith(("rbf.offset", "rbf.temps", "scale_factor")) or ".seq_energy_pre." in key
            or key.startswith("task_steps"))


def ema_state_dict(ckpt: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{parameter key: EMA array}: the EMA tuple zipped in order with the non-skipped state-dict keys (§4.3)."""
    try:
        ema = ckpt["optimizer_states"][0]["ema"]
    except (KeyError, IndexError, TypeError):
        raise LightningCheckpointError(
            "checkpoint has no optimizer_states[0]['ema'] (EMA weights); convert without --ema") from None
    keys = [k for k in ckpt["state_dict"] if not is_ema_skipped(k)]
    if len(keys) != len(ema):
        raise LightningCheckpointError(
            f"EMA tuple has {len(ema)} tensors but the state dict has {len(keys)} parameter keys")
    sd = ckpt["state_dict"]
    mismatched = [f"{k}: state_dict {sd[k].shape} {sd[k].dtype} vs ema {np.shape(e)} {getattr(e, 'dtype', '?')}"
                  for k, e in zip(keys, ema)
                  if not isinstance(e, np.ndarray) or e.shape != sd[k].shape or e.dtype != sd[k].dtype]
    if mismatched:
        raise LightningCheckpointError("EMA tensors do not line up with the state dict:\n  " + "\n  ".join(mismatched))
    return dict(zip(keys, ema))


def with_ema(ckpt: Mapping[str, Any], as_jmp_loads: bool = False) -> dict[str, np.ndarray]:
    """The state dict with every parameter replaced by its EMA value (buffers kept).

    `out_blocks.*.seq_energy_pre.*` aliases `out_blocks.*.layers.*` and has no EMA entry. By default the
    alias follows its target (the EMA model's own state dict). JMP's fine-tuning loader instead leaves
    the alias raw, and torch's load_state_dict loads the alias after `layers`, so the raw values win
    there: `as_jmp_loads=True` reproduces that (out_blocks.*.layers keep their raw weights).
    """
    merged = {**state_dict(ckpt), **ema_state_dict(ckpt)}
    for key in [k for k in merged if ".seq_energy_pre." in k]:
        target = key.replace(".seq_energy_pre.", ".layers.")
        if target in merged:
            if as_jmp_loads:
                merged[target] = merged[key]
            else:
                merged[key] = merged[target]
    return merged


def num_tasks(sd: Mapping[str, np.ndarray]) -> int:
    """Number of pre-training heads (`output.out_energy.{t}.*`), 0 for a backbone-only state dict."""
    tasks = {int(m.group(1)) for k in sd if (m := re.match(r"output\.out_energy\.(\d+)\.", k))}
    if tasks and tasks != set(range(len(tasks))):
        raise LightningCheckpointError(f"output heads are not numbered 0..T-1: {sorted(tasks)}")
    return len(tasks)


def hparams_backbone_fields(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JMP BackboneConfig fields stored in `hyper_parameters`, or None when there are none.

    The config is either the hparams object itself or its `backbone` field (PretrainConfig).
    """
    def find(obj: Any, depth: int) -> dict[str, Any] | None:
        fields = obj.fields if isinstance(obj, torch_pickle.StandIn) else obj
        if not isinstance(fields, Mapping) or depth < 0:
            return None
        if "num_blocks" in fields and "emb_size_edge" in fields:
            return torch_pickle.to_plain(dict(fields))
        for key in ("hparams", "backbone"):
            if key in fields and (found := find(fields[key], depth - 1)) is not None:
                return found
        return None

    return find(ckpt.get("hyper_parameters"), 3)


def _count(sd: Mapping[str, np.ndarray], prefix: str) -> int:
    """Number of indices i with some key starting `prefix{i}.` (they must be 0..n-1)."""
    indices = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if indices != set(range(len(indices))):
        raise LightningCheckpointError(f"keys {prefix}{{i}}.* are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def _count_residual(sd: Mapping[str, np.ndarray], prefix: str) -> int:
    """Number of residual layers `prefix{i}.dense_mlp.*` (a leading plain Dense, if any, is not counted)."""
    return len({m.group(1) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.dense_mlp\.", k))})


def _shape(sd: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise LightningCheckpointError(f"cannot infer the backbone config: key {key!r} is missing")
    return tuple(sd[key].shape)


def infer_backbone_config(sd: Mapping[str, np.ndarray], base: BackboneConfig | None = None) -> BackboneConfig:
    """Backbone sizes read off the state-dict shapes; fields shapes cannot tell come from `base`.

    Torch Linear weights are (out, in); keys are PretrainModel keys (`backbone.*`, `embedding.*`).
    """
    b = "backbone."
    num_elements, emb_atom = _shape(sd, "embedding.atom_embedding.weight")
    emb_rbf, num_radial = _shape(sd, b + "bases.mlp_rbf_qint.linear.weight")
    _, num_spherical, emb_cbf = _shape(sd, b + "bases.mlp_cbf_qint.weight")
    emb_sbf = _shape(sd, b + "bases.mlp_sbf_qint.weight")[2]
    emb_edge = _shape(sd, b + "bases.edge_emb.dense.linear.weight")[0]
    blk = b + "int_blocks.0."
    sizes = dict(
        num_blocks=_count(sd, b + "int_blocks."),
        emb_size_atom=emb_atom, emb_size_edge=emb_edge, num_elements=num_elements,
        emb_size_rbf=emb_rbf, emb_size_cbf=emb_cbf, emb_size_sbf=emb_sbf,
        num_radial=num_radial, num_spherical=num_spherical,
        emb_size_trip_in=_shape(sd, blk + "trip_interaction.down_projection.linear.weight")[0],
        emb_size_trip_out=_shape(sd, blk + "trip_interaction.up_projection_ca.linear.weight")[1],
        emb_size_quad_in=_shape(sd, blk + "quad_interaction.down_projection.linear.weight")[0],
        emb_size_quad_out=_shape(sd, blk + "quad_interaction.up_projection_ca.linear.weight")[1],
        emb_size_aint_in=_shape(sd, blk + "atom_interaction.down_projection.linear.weight")[0],
        emb_size_aint_out=_shape(sd, blk + "atom_interaction.up_projection.linear.weight")[1],
        num_before_skip=_count_residual(sd, blk + "layers_before_skip."),
        num_after_skip=_count_residual(sd, blk + "layers_after_skip."),
        num_concat=_count_residual(sd, blk + "residual_m."),
        num_atom=_count_residual(sd, blk + "atom_update.layers."),
        num_output_afteratom=_count_residual(sd, b + "out_blocks.0.seq_energy2."),
        num_atom_emb_layers=_count_residual(sd, blk + "atom_emb_layers."),
        num_global_out_layers=_count_residual(sd, b + "out_mlp_E.out_mlp."),
        direct_forces=any(k.startswith(b + "out_mlp_F.") for k in sd),
    )
    return dataclasses.replace(base or BackboneConfig(), **sizes)


def backbone_config(ckpt: Mapping[str, Any], sd: Mapping[str, np.ndarray]) -> tuple[BackboneConfig, list[str]]:
    """The checkpoint's backbone config and notes on hparams fields that the weights contradict.

    Shapes win: JMP's pre-training config may name `base()` sizes while holding `large()` weights
    (docs/jmp_spec.md §1.1).
    Fields shapes cannot tell (qint_tags, absolute_rbf_cutoff, envelope exponent) come from hparams.
    """
    fields = hparams_backbone_fields(ckpt)
    base = BackboneConfig.from_jmp_dict(fields) if fields is not None else None
    config = infer_backbone_config(sd, base)
    notes = [] if base is not None else ["no backbone config in hyper_parameters; sizes inferred from shapes"]
    if base is not None:
        notes += [f"hparams {f.name}={getattr(base, f.name)!r} but the weights say {getattr(config, f.name)!r}"
                  for f in dataclasses.fields(BackboneConfig) if getattr(base, f.name) != getattr(config, f.name)]
    return config, notes
