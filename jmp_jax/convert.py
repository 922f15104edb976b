"""Converts a released JMP Lightning checkpoint (or an .npz state dict) to an orbax checkpoint.

  python -m jmp_jax.convert --checkpoint jmp-l.pt --output ckpt/jmp_l [--ema] [--config jmp_s|jmp_l|FILE.json]

Reads the checkpoint without torch, picks the raw or EMA weights (docs/jmp_spec.md §4.3), takes or infers the
backbone config, maps torch keys to `JMPModel(config, num_tasks)` variables with strict checks and
writes `params` / `constants` / `metadata` items (see `jmp_jax.checkpoint.orbax_io`).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

import numpy as np

from jmp_jax.checkpoint import lightning, names, orbax_io
from jmp_jax.models.config import NAMED_CONFIGS, BackboneConfig


def resolve_config(spec: str) -> BackboneConfig:
    """`jmp_s`, `jmp_l` or a JSON file of BackboneConfig fields (JMP's or ours)."""
    if spec in NAMED_CONFIGS:
        return NAMED_CONFIGS[spec]()
    if spec.endswith(".json") and os.path.isfile(spec):
        return BackboneConfig.from_json(spec)
    raise ValueError(f"--config {spec!r}: expected one of {sorted(NAMED_CONFIGS)} or an existing .json file")


def config_name(config: BackboneConfig) -> str:
    return next((name for name, make in NAMED_CONFIGS.items() if make() == config), "custom")


def convert(checkpoint: str, output: str, ema: bool = False, config: BackboneConfig | None = None,
            ema_as_jmp_loads: bool = False) -> dict[str, Any]:
    """Converts `checkpoint` into an orbax checkpoint at `output`; returns a summary dict.

    ema_as_jmp_loads: EMA weights as JMP's fine-tuning ends up with them (see `lightning.with_ema`).

    Raises ValueError subclasses: unreadable file, no EMA weights, unknown/missing/mis-shaped keys.
    """
    # Imported here so `--help` and config errors do not pay for building the model.
    from jmp_jax.models.jmp import variable_shapes

    if os.path.isdir(output) and os.listdir(output):
        raise ValueError(f"output directory {output} exists and is not empty")
    ckpt = lightning.load_checkpoint(checkpoint)
    ema = ema or ema_as_jmp_loads
    state_dict = lightning.with_ema(ckpt, ema_as_jmp_loads) if ema else lightning.state_dict(ckpt)
    notes: list[str] = []
    if config is None:
        config, notes = lightning.backbone_config(ckpt, state_dict)
    num_tasks = lightning.num_tasks(state_dict)
    variables = names.state_dict_to_variables(state_dict, variable_shapes(config, num_tasks))
    metadata = orbax_io.make_metadata(config, num_tasks, os.path.abspath(checkpoint), ema)
    step_dir = orbax_io.save_variables(output, variables, metadata)

    def count(tree: Any) -> int:
        return sum(int(np.size(leaf)) for leaf in names.flatten_variables(tree).values())

    return {
        "output": step_dir, "config": config_name(config), "num_tasks": num_tasks,
        "weights": "ema, out_blocks.*.layers raw as JMP loads them" if ema_as_jmp_loads else "ema" if ema else "raw",
        "num_params": count(variables["params"]), "num_constants": count(variables.get("constants", {})),
        "dropped_keys": sum(1 for k in state_dict if names.dropped_reason(k)),
        "notes": notes,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="Lightning .pt checkpoint or .npz state dict")
    parser.add_argument("--output", required=True, help="orbax checkpoint directory to create")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights (optimizer_states[0]['ema'])")
    parser.add_argument("--ema-as-jmp-loads", action="store_true",
                        help="EMA weights as JMP's fine-tuning loads them: out_blocks.*.layers stay raw")
    parser.add_argument("--config", help="jmp_s, jmp_l or FILE.json (default: inferred from the checkpoint)")
    args = parser.parse_args(argv)
    try:
        config = resolve_config(args.config) if args.config else None
        summary = convert(args.checkpoint, args.output, ema=args.ema, config=config,
                          ema_as_jmp_loads=args.ema_as_jmp_loads)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in summary.pop("notes"):
        print(f"note: {note}")
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    from jmp_jax import cli
    cli.quiet_startup()
    cli.run(main)
