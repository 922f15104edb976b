r"""Real-data check of pre-training: fine-tune from a pre-trained checkpoint vs from scratch, same budget.

  python bench/finetune_vs_scratch.py                     # ~30 min on 2 shared CPU cores (the run in BENCHMARKS.md)
  python bench/finetune_vs_scratch.py --pretrain-steps 20 --rmd17-epochs 1 --qm9-epochs 1 --qm9-train 200 \
      --no-report                                          # a quick trial, BENCHMARKS.md untouched

1. pre-trains the narrow `demo` model on the embedded (small) default dataset with experiments.pretrain
   (a finished pre-training in the workdir is reused);
2. prepares rMD17 ethanol from the official split files in ../shared/data/rmd17 with data_prep.build
   (train file -> 950 train / 50 val, test file -> test) and a QM9 subset from qm9pack (the first n
   molecules of each seed-42 split, through data_prep's QM9 reader and record writer);
3. fine-tunes `demo` models with experiments.finetune from the pre-training's EMA weights and from
   scratch, with identical configs (epochs, batch size, schedule, seed), validating every epoch;
4. writes a learning-curve plot (bench/finetune_vs_scratch.png) and appends the table, commands and a
   reading of the result to BENCHMARKS.md (unless --no-report).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only writes the QM9 subset's records here
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import common  # noqa: E402

RMD17_DIR = os.path.join("..", "shared", "data", "rmd17")  # the official split 01 files, all frames
RMD17_FILES = {"train": "rmd17_ethanol_train_01.npz", "test": "rmd17_ethanol_test_01.npz"}
PLOT = os.path.join("bench", "finetune_vs_scratch.png")
INITS = ("pretrained", "scratch")


class StepFailedError(RuntimeError):
    """A sub-command of the benchmark exited with an error."""


def run_logged(argv: list[str], log_path: str) -> float:
    """Runs `argv` in the repository root with its output in `log_path`; returns the wall time in s."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print(f"$ {shlex.join(argv)}   (log: {log_path})", file=sys.stderr, flush=True)
    env = dict(os.environ)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - start
    if code != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise StepFailedError(f"`{shlex.join(argv)}` exited with {code} after {wall:.0f} s; log tail:\n{tail}")
    return wall


def pretrain(workdir: str, steps: int, dataset_size: str) -> tuple[list[str], float | None]:
    """Pre-trains `demo` for `steps` steps; (command, wall s), wall None when a finished run was reused."""
    argv = [sys.executable, "-m", "experiments.pretrain", "--config=configs/jmp_s.py:demo",
            f"--config.train.num_steps={steps}", f"--config.data.default_dataset_size={dataset_size}",
            f"--workdir={workdir}"]
    if os.path.isdir(os.path.join(REPO, workdir, "checkpoints", str(steps))):
        return argv, None
    return argv, run_logged(argv, os.path.join(REPO, workdir + ".log"))


def prepare_rmd17(data_dir: str, log_dir: str) -> list[list[str]]:
    """Official rMD17 ethanol split 01 as data_prep.build writes it; returns the commands."""
    commands = [[sys.executable, "-m", "data_prep.build", "--source", "rmd17",
                 "--input", os.path.join(RMD17_DIR, RMD17_FILES[role]), "--output", data_dir]
                for role in ("train", "test")]
    done = all(os.path.exists(os.path.join(REPO, data_dir, f"rmd17_ethanol-{s}.metadata.json"))
               for s in ("train", "val", "test"))
    for i, argv in enumerate(commands):
        if not done:
            run_logged(argv, os.path.join(log_dir, f"build_rmd17_{i}.log"))
    return commands


def prepare_qm9_subset(data_dir: str, sizes: dict[str, int]) -> None:
    """The first sizes[split] molecules of each seed-42 QM9 split (a random subset: the split is shuffled)."""
    from data_prep import shard_writer
    from jmp_jax.data import records
    from data_prep.sources import qm9

    out = os.path.join(REPO, data_dir)
    if all(os.path.exists(records.metadata_path(out, "qm9", s)) for s in sizes):
        return
    for plan in qm9.plans(None, source="qm9"):
        shard_writer.write_split(itertools.islice(plan.records(), sizes[plan.split]), out, plan.name, plan.split,
                            units=plan.units, source_files=plan.source_files, extra_metadata=plan.extra_metadata)


def finetune(config: str, data_dir: str, init: str, workdir: str, epochs: int, batch_size: int
             ) -> tuple[list[str], float, dict, list[dict]]:
    """One fine-tuning run in a fresh workdir: (command, wall s, results.json, per-epoch metric lines)."""
    argv = [sys.executable, "-m", "experiments.finetune", f"--config={config}", f"--config.data.dir={data_dir}",
            f"--config.train.max_epochs={epochs}", f"--config.optim.cosine_epochs={float(epochs)}",
            f"--config.data.batch_size={batch_size}", f"--init={init}", f"--workdir={workdir}"]
    shutil.rmtree(os.path.join(REPO, workdir), ignore_errors=True)  # metrics.jsonl is appended to
    wall = run_logged(argv, os.path.join(REPO, workdir + ".log"))
    with open(os.path.join(REPO, workdir, "results.json")) as f:
        result = json.load(f)
    with open(os.path.join(REPO, workdir, "metrics.jsonl")) as f:
        epochs_log = [line for line in map(json.loads, f) if "epoch" in line]
    return argv, wall, result, epochs_log


def plot(curves: dict[str, dict[str, list[float]]], ylabels: dict[str, str], path: str) -> None:
    """One panel per dataset: validation metric per epoch for each initialisation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False)
    for ax, (dataset, by_init) in zip(axes[0], curves.items()):
        for init, values in by_init.items():
            ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=init)
        ax.set(title=dataset, xlabel="epoch", ylabel=ylabels[dataset], yscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(REPO, path), dpi=80)
    plt.close(fig)


def reading(dataset: str, unit: str, test: dict[str, float]) -> str:
    """One honest sentence comparing the two test errors."""
    pre, scratch = test["pretrained"], test["scratch"]
    change = (pre - scratch) / scratch * 100
    verdict = "lower" if pre < scratch else "higher"
    return (f"{dataset}: fine-tuning from the pre-trained checkpoint ends at {pre:.1f} {unit}, {abs(change):.0f}% "
            f"{verdict} than training from scratch ({scratch:.1f} {unit}) with the same budget.")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdir/finetune_vs_scratch", help="relative to the repo root")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--pretrain-data", choices=("small", "full"), default="full",
                        help="embedded default dataset size (full: 4,000 structures, built once in ~2 min)")
    parser.add_argument("--rmd17-epochs", type=int, default=3)
    parser.add_argument("--rmd17-batch-size", type=int, default=4, help="JMP uses 1; larger is faster on CPU")
    parser.add_argument("--qm9-target", default="U_0")
    parser.add_argument("--qm9-train", type=int, default=1000)
    parser.add_argument("--qm9-val", type=int, default=100)
    parser.add_argument("--qm9-test", type=int, default=500)
    parser.add_argument("--qm9-epochs", type=int, default=3)
    parser.add_argument("--qm9-batch-size", type=int, default=16, help="JMP uses 48")
    parser.add_argument("--no-report", action="store_true", help="do not write the plot or BENCHMARKS.md")
    args = parser.parse_args()
    start = time.perf_counter()
    wd = args.workdir

    pretrain_dir = os.path.join(wd, f"pretrain_demo_{args.pretrain_data}")
    pretrain_cmd, pretrain_wall = pretrain(pretrain_dir, args.pretrain_steps, args.pretrain_data)
    rmd17_dir = os.path.join(wd, "data", "rmd17")
    build_cmds = prepare_rmd17(rmd17_dir, os.path.join(REPO, wd, "logs"))
    qm9_sizes = {"train": args.qm9_train, "val": args.qm9_val, "test": args.qm9_test}
    qm9_dir = os.path.join(wd, "data", f"qm9_{args.qm9_train}_{args.qm9_val}_{args.qm9_test}")
    prepare_qm9_subset(qm9_dir, qm9_sizes)

    # dataset -> (config, data dir, epochs, batch size, test metric key, factor to the reported unit, unit)
    datasets = {
        "rMD17 ethanol": ("configs/finetune/rmd17.py:ethanol,demo", rmd17_dir, args.rmd17_epochs,
                          args.rmd17_batch_size, "force_mae", 1e3, "meV/Å"),
        f"QM9 {args.qm9_target}": (f"configs/finetune/qm9.py:{args.qm9_target},demo", qm9_dir, args.qm9_epochs,
                                   args.qm9_batch_size, "mae", 1e3, "meV"),
    }
    rows, commands, curves, ylabels, sentences = [], [], {}, {}, []
    for dataset, (config, data_dir, epochs, batch, key, factor, unit) in datasets.items():
        curves[dataset], ylabels[dataset], test = {}, f"val {key} ({unit})", {}
        for init in INITS:
            run_dir = os.path.join(wd, "runs", f"{dataset.split()[0].lower()}_{init}")
            argv, wall, result, log = finetune(config, data_dir, pretrain_dir if init == "pretrained" else "scratch",
                                               run_dir, epochs, batch)
            commands.append(argv)
            curves[dataset][init] = [line[f"val/{key}"] * factor for line in log]
            test[init] = result["test"][key] * factor
            rows.append([dataset, init, f"{test[init]:.1f} {unit}", result["epochs"], result["best_epoch"] + 1,
                         " ".join(f"{v:.1f}" for v in curves[dataset][init]), f"{wall:.0f} s"])
            print(f"{dataset} {init}: test {key} {test[init]:.2f} {unit}, {wall:.0f} s", file=sys.stderr, flush=True)
        sentences.append(reading(dataset, unit, test))
    total = time.perf_counter() - start

    header = ["dataset", "init", "test MAE (best val epoch)", "epochs", "best epoch", "val MAE per epoch", "wall"]
    table = common.table(header, rows)
    print(table)
    print("\n".join(sentences))
    if args.no_report:
        return
    plot(curves, ylabels, PLOT)
    pretrain_note = (f"{pretrain_wall:.0f} s" if pretrain_wall is not None
                     else "reused a finished run in the workdir")
    shown = [shlex.join(["python", *c[1:]]) for c in [pretrain_cmd, *build_cmds, *commands]]
    text = (f"{table}\n\n![learning curves]({PLOT})\n\n" + "\n".join(f"- {s}" for s in sentences) + "\n\n"
            f"Pre-training: `demo` backbone, {args.pretrain_steps} steps of 4 structures on the {args.pretrain_data} "
            f"embedded default dataset ({pretrain_note}). rMD17: official split 01 (950 train / 50 val from the train "
            f"file, all 1,000 test frames), forces-only loss, batch {args.rmd17_batch_size}. QM9 {args.qm9_target}: "
            f"{args.qm9_train} train / {args.qm9_val} val / {args.qm9_test} test molecules (the first of each "
            f"seed-42 split, written with `data_prep.sources.qm9.plans` + `data_prep.shard_writer.write_split`), batch "
            f"{args.qm9_batch_size}. Both inits use the same config, seed, epochs and schedule (1 warm-up epoch, "
            f"cosine over all epochs); the test MAE uses the weights of the best validation epoch. Wall times "
            f"include compilation, data loading and the test pass, and grow when other jobs share the CPUs; "
            f"total {total / 60:.1f} min.\n\nCommands run (repository root):\n\n```\n" + "\n".join(shown) + "\n```")
    notes = (f"The `demo` model (2 blocks, 64 wide) pre-trained for {args.pretrain_steps * 4} structure visits "
             "on the embedded default dataset (EMT slabs, GFN2-xTB-labelled rattled QM9 molecules and reaction "
             "paths) is tiny next to JMP-S/L pre-trained on ~120M DFT structures, and the fine-tuning budgets are "
             "a few CPU epochs: this tests the fine-tuning-from-checkpoint mechanism end to end on real data, not "
             "the paper's numbers. One seed per init: read the gaps as indicative, not significant.")
    common.report("finetune_vs_scratch: pre-trained vs scratch fine-tuning on rMD17 ethanol and QM9", text, notes)


if __name__ == "__main__":
    main()
