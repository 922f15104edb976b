r"""t-SNE of per-layer atom embeddings across datasets (the JMP paper's embedding figure).

  python -m experiments.embeddings --checkpoint jmp-s-orbax \
      --data data/oc20:oc20:val --data data/ani1x:ani1x:val --per-dataset 100 --output embeddings/ [--seed 0]

Samples --per-dataset structures from each DIR:SOURCE:SPLIT, embeds them with `PretrainedModel.embed`, takes a
random subset of at most --max-atoms atoms (split evenly over the datasets, so that datasets of large structures
do not crowd out molecules; the same atoms in every layer) and runs scikit-learn t-SNE on each layer.
Writes tsne_by_dataset.png (one panel per layer, coloured by dataset), tsne_by_element.png (coloured by
element), tsne.npz (2-D coordinates per layer, dataset index and Z of every plotted atom) and embeddings.json.
Deterministic for a given --seed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Sequence

import numpy as np
from ase.data import chemical_symbols

from experiments.evaluate import STRUCTURES_PER_CALL, read_tasks, record_to_atoms

MAX_ELEMENT_COLOURS = 20  # more elements than tab20 has colours are drawn grey as "other"


class DatasetSpecError(ValueError):
    """A --data argument that is not DIR:SOURCE:SPLIT, or a split with too few records."""


def parse_dataset_spec(spec: str) -> tuple[str, str, str]:
    """"DIR:SOURCE:SPLIT" -> (dir, source, split); DIR may itself contain ':'."""
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        raise DatasetSpecError(f"--data {spec!r}: expected DIR:SOURCE:SPLIT")
    return parts[0], parts[1], parts[2]


def sample_records(data: str, source: str, split: str, count: int, rng: np.random.Generator) -> list[dict]:
    """count records drawn without replacement, in stored order, from the split (its shards checked)."""
    from jmp_jax.data import task_data  # TensorFlow import; only needed for reading
    opened = task_data.open_source(data, source, split)
    if len(opened) < count:
        raise DatasetSpecError(f"{source}-{split} in {data} has {len(opened)} records; --per-dataset asks for {count}")
    return [opened[int(i)] for i in sorted(rng.choice(len(opened), size=count, replace=False))]


def tsne_inputs(per_structure: Sequence[dict[str, np.ndarray]], dataset_ids: np.ndarray,
                atomic_numbers: np.ndarray, max_atoms: int, rng: np.random.Generator):
    """The atoms to embed, chosen evenly over datasets.

    per_structure: `embed` output, one {layer: (n_i, A)} per structure; dataset_ids, atomic_numbers: (M,) per
    atom of all structures concatenated (M = sum n_i). Returns ({layer: (K, A)}, dataset ids (K,), Z (K,)),
    K <= max_atoms, with each dataset contributing at most max_atoms // num_datasets atoms.
    """
    datasets = np.unique(dataset_ids)
    quota = max(max_atoms // len(datasets), 1)
    keep = []
    for d in datasets:
        members = np.flatnonzero(dataset_ids == d)
        keep.append(members if len(members) <= quota else rng.choice(members, quota, replace=False))
    keep = np.sort(np.concatenate(keep))
    layers = {name: np.concatenate([s[name] for s in per_structure])[keep] for name in per_structure[0]}
    return layers, dataset_ids[keep], atomic_numbers[keep]


def tsne_2d(features: np.ndarray, seed: int, perplexity: float = 30.0) -> np.ndarray:
    """(K, A) -> (K, 2) t-SNE coordinates; perplexity is lowered to fit small K (it must stay below K)."""
    from sklearn.manifold import TSNE
    perplexity = min(perplexity, max((len(features) - 1) / 3.0, 1.0))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(np.asarray(features, np.float64))


def plot_panels(coords: dict[str, np.ndarray], labels: np.ndarray, names: Sequence[str], path: str,
                title: str) -> str:
    """One scatter panel per layer, points coloured by labels (K,) in 0..len(names)-1; legend of names."""
    import matplotlib
    matplotlib.use("Agg")  # files only
    from matplotlib import pyplot as plt

    columns = min(len(coords), 4)
    rows = math.ceil(len(coords) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns + 1.2, 3.8 * rows), squeeze=False,
                             layout="constrained")
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for ax, (layer, xy) in zip(axes.flat, coords.items()):
        for label, name in enumerate(names):
            points = xy[labels == label]
            colour = "0.7" if name == "other" else colours(label % colours.N)
            ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.7, color=colour, linewidths=0, label=name,
                       rasterized=True)
        ax.set_title(layer, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(coords):]:
        ax.set_visible(False)
    handles, legend_names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, legend_names, loc="outside right center", markerscale=4, frameon=False, fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def element_labels(atomic_numbers: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(K,) label per atom and the legend names: the most common elements, the rest as "other"."""
    elements, counts = np.unique(atomic_numbers, return_counts=True)
    order = elements[np.argsort(-counts, kind="stable")]
    named = order if len(order) <= MAX_ELEMENT_COLOURS else order[:MAX_ELEMENT_COLOURS - 1]
    names = [chemical_symbols[z] for z in named] + ([] if len(named) == len(order) else ["other"])
    lookup = {z: i for i, z in enumerate(named)}
    labels = np.array([lookup.get(z, len(named)) for z in atomic_numbers.tolist()], np.int64)
    return labels, names


def run_embeddings(model, datasets: Sequence[str], per_dataset: int, output: str, *, seed: int = 0,
                   max_atoms: int = 2000, perplexity: float = 30.0, batch_size: int = 16) -> dict:
    """Samples, embeds, runs t-SNE per layer, writes the figures, tsne.npz and embeddings.json; returns the summary."""
    os.makedirs(output, exist_ok=True)
    rng = np.random.default_rng(seed)
    specs = [parse_dataset_spec(s) for s in datasets]
    names = [f"{source}-{split}" for _, source, split in specs]
    records, dataset_ids = [], []
    for index, (data, source, split) in enumerate(specs):
        sampled = sample_records(data, source, split, per_dataset, rng)
        records += sampled
        dataset_ids += [np.full(len(r["atomic_numbers"]), index) for r in sampled]
    # Datasets are embedded together (fewer distinct padded shapes, so fewer compiles), in chunks that bound
    # the host memory held by graphs.
    per_structure = []
    for start in range(0, len(records), STRUCTURES_PER_CALL):
        atoms = [record_to_atoms(r) for r in records[start:start + STRUCTURES_PER_CALL]]
        per_structure += model.embed(atoms, batch_size=batch_size)
    atomic_numbers = np.concatenate([r["atomic_numbers"] for r in records])
    layers, ids, z = tsne_inputs(per_structure, np.concatenate(dataset_ids), atomic_numbers, max_atoms, rng)
    coords = {layer: tsne_2d(features, seed, perplexity) for layer, features in layers.items()}
    element_ids, element_names = element_labels(z)
    figures = [plot_panels(coords, ids, names, os.path.join(output, "tsne_by_dataset.png"),
                           "t-SNE of atom embeddings by dataset"),
               plot_panels(coords, element_ids, element_names, os.path.join(output, "tsne_by_element.png"),
                           "t-SNE of atom embeddings by element")]
    np.savez(os.path.join(output, "tsne.npz"), dataset_ids=ids, atomic_numbers=z,
             **{f"coords_{layer}": xy for layer, xy in coords.items()})
    summary = {"datasets": names, "per_dataset": per_dataset, "seed": seed, "num_atoms_total": len(atomic_numbers),
               "num_atoms_plotted": int(len(ids)), "layers": {k: list(v.shape) for k, v in layers.items()},
               "figures": [os.path.basename(f) for f in figures]}
    with open(os.path.join(output, "embeddings.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.embeddings", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", action="append", required=True, help="DIR:SOURCE:SPLIT (repeat per dataset)")
    parser.add_argument("--per-dataset", type=int, default=100, help="structures sampled from each dataset")
    parser.add_argument("--max-atoms", type=int, default=2000, help="atoms given to t-SNE, over all datasets")
    parser.add_argument("--perplexity", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="embeddings")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights of a training checkpoint")
    parser.add_argument("--tasks", default=None, help="JSON list of per-head {name, energy_std, force_std}, for "
                        "checkpoints whose metadata has none (heads are not used here, but loading needs them)")
    args = parser.parse_args(argv)
    if args.per_dataset < 1 or args.max_atoms < 2:
        parser.error("--per-dataset must be >= 1 and --max-atoms >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    import jmp_jax
    args = parse_args(argv)
    model = jmp_jax.load_pretrained(args.checkpoint, ema=not args.no_ema, tasks=read_tasks(args.tasks))
    summary = run_embeddings(model, args.data, args.per_dataset, args.output, seed=args.seed,
                             max_atoms=args.max_atoms, perplexity=args.perplexity)
    print(f"t-SNE of {summary['num_atoms_plotted']} of {summary['num_atoms_total']} atoms, layers "
          f"{', '.join(summary['layers'])}\nwrote {', '.join(summary['figures'])} in {args.output}")
    return summary


if __name__ == "__main__":
    from jmp_jax import cli, compilation_cache
    cli.quiet_startup()
    compilation_cache.enable()
    cli.run(main)
