r"""Metrics of a checkpoint on a prepared split, with parity plots.

  python -m experiments.evaluate --checkpoint jmp-s-orbax --data data/oc20 --source oc20 --split test \
      [--head oc20|0] [--target NAME] [--forces direct|gradient] [--output DIR] [--max-structures N]

Writes to --output: metrics.json, predictions.npz and parity PNGs (energy.png, forces.png, target.png for what
the split has), and prints a table. Forces are compared on the atoms that were free in the DFT run
(record["fixed"] False), as in OC20's metrics.

Two kinds of checkpoint:
- pre-trained / converted (`load_pretrained`): --head picks the head; energies are total energies (`predict`
  adds the head's linear reference back); --target NAME compares the head's scalar (energy) output with
  record["targets"][NAME].
- fine-tuned (`experiments.finetune`: metadata "finetune"; its workdir or best/<epoch> step dir): its one
  task head in physical units: a scalar target (MAE/RMSE), class logits (balanced accuracy) or forces (the
  energy of a forces-only task is defined up to scale, so it is not scored). --target defaults to the task's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
from ase import Atoms

from jmp_jax import evaluation

STRUCTURES_PER_CALL = 256  # structures per predict / embed call: bounds the host memory held by graphs
MAX_PLOTTED_FORCE_ATOMS = 50_000  # a larger scatter only slows the plot down


def record_to_atoms(record: dict) -> Atoms:
    """A prepared record (jmp_jax.data.records schema) as ase.Atoms with its tags (labels are not attached)."""
    return Atoms(numbers=record["atomic_numbers"], positions=record["positions"], cell=record["cell"],
                 pbc=record["pbc"], tags=record["tags"])


def read_records(data: str, source: str, split: str, max_structures: int | None = None) -> list[dict]:
    """The first max_structures records of a split (all when None), in stored order, its shards checked."""
    from jmp_jax.data import task_data  # TensorFlow import; only the CLIs need it
    opened = task_data.open_source(data, source, split)
    count = len(opened) if max_structures is None else min(max_structures, len(opened))
    return [opened[i] for i in range(count)]


def truth_from_records(records: Sequence[dict], target: str | None = None, classes: bool = False) -> dict:
    """Labels for `evaluation.compute_metrics`: energy / forces only when every record has them; the target
    as "labels" (integers) when classes, else as "target"."""
    truth = {"natoms": np.array([len(r["atomic_numbers"]) for r in records])}
    if all("energy" in r for r in records):
        truth["energy"] = np.array([r["energy"] for r in records])
    if all("forces" in r for r in records):
        truth["forces"] = [r["forces"] for r in records]
        truth["force_mask"] = [~np.asarray(r["fixed"], bool) for r in records]
    if target is not None:
        missing = [r["source_id"] for r in records if target not in r.get("targets", {})]
        if missing:
            raise evaluation.EvaluationInputError(
                f"target {target!r} missing from {len(missing)} records, e.g. {missing[0]!r}")
        values = np.array([r["targets"][target] for r in records])
        if classes:
            truth["labels"] = np.round(values).astype(np.int64)
        else:
            truth["target"] = values
    return truth


def predict_in_chunks(predict, records: Sequence[dict]) -> dict:
    """predict(list of Atoms) -> dict over the records, STRUCTURES_PER_CALL at a time: arrays concatenated,
    lists (per-atom forces) joined."""
    parts: dict[str, list] = {}
    for start in range(0, len(records), STRUCTURES_PER_CALL):
        out = predict([record_to_atoms(r) for r in records[start:start + STRUCTURES_PER_CALL]])
        for key, value in out.items():
            parts.setdefault(key, []).append(value)
    return {key: [f for part in value for f in part] if key == "forces" else np.concatenate(value)
            for key, value in parts.items()}


@dataclasses.dataclass
class PretrainedHead:
    """One head of a `load_pretrained` model: total energies (eV), forces (eV/Å); the energy stands for a target."""

    model: Any
    head: int
    forces: str = "direct"
    batch_size: int = 16
    default_target = None
    classifier = False

    @property
    def info(self) -> dict:
        return {"head": self.model.task_names[self.head], "head_index": self.head, "kind": "energy",
                "forces_mode": self.forces}

    def predict(self, records: Sequence[dict], target: str | None) -> dict:
        """{"energy": (B,) eV, "forces": list of (n_i, 3) eV/Å[, "target": (B,)]}."""
        prediction = predict_in_chunks(
            lambda atoms: self.model.predict(atoms, head=self.head, forces=self.forces, batch_size=self.batch_size),
            records)
        if target is not None:
            prediction["target"] = prediction["energy"]
        return prediction


class FinetunedHead:
    """The task head of a fine-tuned model (`jmp_jax.FinetunedModel`), in physical units: a scalar target,
    class logits, or forces (eV/Å; the energy of a forces-only task is defined up to a constant, not scored)."""

    def __init__(self, model, batch_size: int = 16):
        self.model, self.batch_size = model, batch_size
        kind = model.spec.kind
        self.default_target = (model.task.get("target") or None) if kind != "forces" else None
        self.classifier = kind == "classification"
        self.forces = model.force_mode(None) if kind == "forces" else None

    @property
    def info(self) -> dict:
        return {"head": self.model.task["name"], "head_index": 0, "kind": self.model.spec.kind,
                "forces_mode": self.forces}

    def predict(self, records: Sequence[dict], target: str | None) -> dict:
        """{"target": (B,)} | {"logits": (B, C)} | {"forces": list of (n_i, 3) eV/Å}, by the head's kind."""
        out = predict_in_chunks(lambda atoms: self.model.predict(atoms, batch_size=self.batch_size), records)
        if self.forces:
            return {"forces": out["forces"]}
        return {"logits": out["logits"]} if self.classifier else {"target": out[self.model.target]}


def read_tasks(path: str | None) -> list[dict] | None:
    """--tasks: a JSON file with a list of {"name", "energy_std", "force_std"[, "linear_reference"]}, one per head."""
    if path is None:
        return None
    with open(path) as f:
        tasks = json.load(f)
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise evaluation.EvaluationInputError(f"--tasks {path}: expected a JSON list of task objects")
    return tasks


def load_head(checkpoint: str, *, source: str, head: str | None, forces: str | None, ema: bool = True,
              batch_size: int = 16, tasks: list[dict] | None = None):
    """A PretrainedHead or FinetunedHead for the checkpoint (converter output, pre-training or fine-tuning run
    dir, or step dir). head: index or task name (pre-trained; default: the head named like source, else 0).
    tasks: per-head statistics for pre-trained checkpoints whose metadata has none (see `load_pretrained`)."""
    import jmp_jax

    model = jmp_jax.load_pretrained(checkpoint, ema=ema, tasks=tasks)
    if head is None:
        index = model.head_index(source) if source in model.task_names else 0
    else:
        index = model.head_index(int(head) if head.isdigit() else head)
    if isinstance(model, jmp_jax.FinetunedModel):
        if forces is not None:
            model.force_mode(forces)
        return FinetunedHead(model, batch_size)
    return PretrainedHead(model, index, model.force_mode(forces), batch_size)


def format_table(metrics: dict) -> str:
    """The metrics as an aligned text table (one row per metric group)."""
    units = {"energy": "eV", "energy_per_atom": "eV/atom", "forces": "eV/Å", "target": "target units"}
    lines = [f"{'quantity':<16}{'MAE':>12}{'RMSE':>12}  {'unit':<13}{'n':>8}"]
    for name, values in metrics.items():
        if name == "classification":
            lines.append(f"{'balanced acc.':<16}{values['balanced_accuracy']:>12.4f}{'':>12}  {'':<13}"
                         f"{values['count']:>8}")
            continue
        lines.append(f"{name:<16}{values['mae']:>12.5g}{values['rmse']:>12.5g}  {units[name]:<13}{values['count']:>8}")
        if name == "forces":
            lines.append(f"{'forces |dF|':<16}{values['l2_mae']:>12.5g}{'':>12}  {'eV/Å':<13}{values['count']:>8}")
    return "\n".join(lines)


def write_plots(output: str, truth: dict, prediction: dict, title: str, seed: int = 0) -> list[str]:
    """Parity PNGs for energy, forces (free atoms, at most MAX_PLOTTED_FORCE_ATOMS) and target, where both
    truth and prediction have them."""
    paths = []
    if "energy" in truth and "energy" in prediction:
        paths.append(evaluation.parity_plot(truth["energy"], prediction["energy"], os.path.join(output, "energy.png"),
                                            label="energy", unit="eV", suptitle=title))
    if "forces" in truth and "forces" in prediction:
        mask = np.concatenate(truth["force_mask"])
        true, pred = np.concatenate(truth["forces"])[mask], np.concatenate(prediction["forces"])[mask]
        if len(true) > MAX_PLOTTED_FORCE_ATOMS:
            keep = np.sort(np.random.default_rng(seed).choice(len(true), MAX_PLOTTED_FORCE_ATOMS, replace=False))
            true, pred = true[keep], pred[keep]
        if len(true):
            paths.append(evaluation.force_parity_plot(true, pred, os.path.join(output, "forces.png"), suptitle=title))
    if "target" in truth and "target" in prediction:
        paths.append(evaluation.parity_plot(truth["target"], prediction["target"], os.path.join(output, "target.png"),
                                            label="target", unit="target units", suptitle=title))
    return paths


def save_predictions(path: str, truth: dict, prediction: dict) -> None:
    """predictions.npz: per-structure values (<key>_true / <key>_pred) and concatenated per-atom forces."""
    arrays = {"natoms": truth["natoms"]}
    arrays.update({f"{k}_true": truth[k] for k in ("energy", "target", "labels") if k in truth})
    arrays.update({f"{k}_pred": prediction[k] for k in ("energy", "target", "logits") if k in prediction})
    if "forces" in prediction:
        arrays["forces_pred"] = np.concatenate(prediction["forces"])
    if "forces" in truth:
        arrays["forces_true"] = np.concatenate(truth["forces"])
        arrays["force_mask"] = np.concatenate(truth["force_mask"])
    np.savez(path, **arrays)


def evaluate_split(predictor, records: Sequence[dict], output: str, *, target: str | None = None,
                   info: dict | None = None) -> dict:
    """Predicts with a PretrainedHead / FinetunedHead, computes metrics, writes metrics.json / predictions.npz /
    PNGs into output; returns the summary. target: record target name (default: the predictor's)."""
    os.makedirs(output, exist_ok=True)
    target = target or predictor.default_target
    truth = truth_from_records(records, target, classes=predictor.classifier)
    prediction = predictor.predict(records, target)
    metrics = evaluation.compute_metrics(truth, prediction)
    summary = {**(info or {}), **predictor.info, "target": target, "num_structures": len(records),
               "num_atoms": int(truth["natoms"].sum()), "metrics": metrics}
    title = " ".join(str(summary[k]) for k in ("source", "split") if k in summary) + f" | head {summary['head']}"
    summary["plots"] = [os.path.basename(p) for p in write_plots(output, truth, prediction, title)]
    save_predictions(os.path.join(output, "predictions.npz"), truth, prediction)
    with open(os.path.join(output, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="converter output, training checkpoint or run dir")
    parser.add_argument("--data", required=True, help="folder of prepared splits (data_prep output)")
    parser.add_argument("--source", required=True, help="dataset name, e.g. oc20")
    parser.add_argument("--split", default="test")
    parser.add_argument("--head", default=None, help="head index or task name (default: --source if a task)")
    parser.add_argument("--target", default=None, help="scalar target name in the records (fine-tuned: the task's)")
    parser.add_argument("--forces", default=None, choices=("direct", "gradient"),
                        help="pre-trained heads: default direct; fine-tuned: the checkpoint's")
    parser.add_argument("--output", default=None, help="default: eval/<source>-<split>")
    parser.add_argument("--max-structures", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights of a training checkpoint")
    parser.add_argument("--tasks", default=None, help="JSON list of per-head {name, energy_std, force_std}, for "
                        "pre-trained checkpoints whose metadata has none")
    args = parser.parse_args(argv)
    if args.max_structures is not None and args.max_structures < 1:
        parser.error(f"--max-structures must be >= 1, got {args.max_structures}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    output = args.output or os.path.join("eval", f"{args.source}-{args.split}")
    predictor = load_head(args.checkpoint, source=args.source, head=args.head, forces=args.forces,
                          ema=not args.no_ema, batch_size=args.batch_size, tasks=read_tasks(args.tasks))
    records = read_records(args.data, args.source, args.split, args.max_structures)
    info = {"checkpoint": os.path.abspath(args.checkpoint), "data": os.path.abspath(args.data),
            "source": args.source, "split": args.split}
    summary = evaluate_split(predictor, records, output, target=args.target, info=info)
    print(f"{args.source}-{args.split}: {summary['num_structures']} structures, head {summary['head']!r} "
          f"({summary['kind']}), forces {summary['forces_mode']}")
    print(format_table(summary["metrics"]))
    print(f"wrote {os.path.join(output, 'metrics.json')} and {', '.join(summary['plots'])}")
    return summary


if __name__ == "__main__":
    from jmp_jax import cli, compilation_cache
    cli.quiet_startup()
    compilation_cache.enable()
    cli.run(main)
