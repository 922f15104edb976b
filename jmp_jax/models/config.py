"""GemNet-OC backbone hyper-parameters as JMP uses them (docs/jmp_spec.md §1.1)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """Sizes of the GemNet-OC backbone. Field names follow JMP's `BackboneConfig`."""

    num_blocks: int = 4
    emb_size_atom: int = 256
    emb_size_edge: int = 512
    emb_size_trip_in: int = 64
    emb_size_trip_out: int = 64
    emb_size_quad_in: int = 32
    emb_size_quad_out: int = 32
    emb_size_aint_in: int = 64
    emb_size_aint_out: int = 64
    emb_size_rbf: int = 16
    emb_size_cbf: int = 16
    emb_size_sbf: int = 32
    num_radial: int = 128
    num_spherical: int = 7
    num_before_skip: int = 2
    num_after_skip: int = 2
    num_concat: int = 1
    num_atom: int = 3
    num_output_afteratom: int = 3
    num_atom_emb_layers: int = 2
    num_global_out_layers: int = 2
    num_elements: int = 120
    envelope_exponent: int = 5
    # Every radial basis divides distances by this fixed length, whatever the graph cutoff.
    absolute_rbf_cutoff: float = 12.0
    qint_tags: tuple[int, ...] = (1, 2)
    # False drops the direct-force branch (out_mlp_F, seq_forces, dense_rbf_F), as scalar fine-tuning does.
    direct_forces: bool = True
    edge_dropout: float | None = None

    @classmethod
    def from_jmp_dict(cls, d: Mapping[str, Any]) -> "BackboneConfig":
        """Builds a config from a JMP `BackboneConfig` field dict (as in the fixtures' config.json)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "qint_tags" in kwargs:
            kwargs["qint_tags"] = tuple(kwargs["qint_tags"])
        envelope = d.get("envelope") or {}
        if "exponent" in envelope:
            kwargs["envelope_exponent"] = int(envelope["exponent"])
        if d.get("regress_forces") is False or d.get("direct_forces") is False:
            kwargs["direct_forces"] = False
        for field, expected in (("activation", "scaled_silu"), ("sbf", {"name": "legendre_outer"}),
                                ("cbf", {"name": "spherical_harmonics"}), ("rbf", {"name": "gaussian"})):
            if field in d and d[field] != expected:
                raise ValueError(f"config field {field!r} = {d[field]!r} is not supported (only {expected!r})")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str) -> "BackboneConfig":
        with open(path) as f:
            return cls.from_jmp_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["qint_tags"] = list(self.qint_tags)
        return d


def jmp_s() -> BackboneConfig:
    """JMP-S = GemNet-OC `BackboneConfig.base()`."""
    return BackboneConfig()


def jmp_l() -> BackboneConfig:
    """JMP-L = GemNet-OC `BackboneConfig.large()`."""
    return BackboneConfig(
        num_blocks=6, emb_size_edge=1024, emb_size_trip_out=128, emb_size_quad_in=64,
        emb_size_rbf=32, emb_size_sbf=64, num_concat=4,
    )


def demo() -> BackboneConfig:
    """The narrow model of the reference fixtures (2 blocks, 64 wide): fast enough for CPU demos and tests."""
    return BackboneConfig(
        num_blocks=2, emb_size_atom=64, emb_size_edge=64, emb_size_trip_in=16, emb_size_trip_out=16,
        emb_size_quad_in=8, emb_size_quad_out=8, emb_size_aint_in=16, emb_size_aint_out=16,
        emb_size_rbf=8, emb_size_cbf=8, emb_size_sbf=16, num_radial=16,
    )


def demo_one_block() -> BackboneConfig:
    """The demo model with one interaction block: the pre-training system tests' model (each of their runs
    traces, compiles and steps it, and all three grow with depth)."""
    return dataclasses.replace(demo(), num_blocks=1)


NAMED_CONFIGS = {"jmp_s": jmp_s, "jmp_l": jmp_l, "demo": demo, "demo_one_block": demo_one_block}
