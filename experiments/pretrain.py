r"""Multi-task JMP pre-training.

  python -m experiments.pretrain --config=configs/jmp_s.py:demo --workdir=workdir/demo
  python -m experiments.pretrain --config=configs/jmp_s.py --config.train.num_steps=100

Runs again with the same --workdir resume from its newest checkpoint.
"""
from jmp_jax import cli, compilation_cache

cli.quiet_startup()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from data_prep import default_dataset  # noqa: E402
from jmp_jax.training import loop  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/jmp_s.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/pretrain", "Checkpoints, metrics.jsonl and TensorBoard events.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    config.data.dir = default_dataset.data_dir_for(config)  # empty: the embedded default dataset
    result = loop.run(config, _WORKDIR.value)
    print(f"finished at step {result['step']}\n  checkpoints: {result['checkpoints']}\n"
          f"  metrics:     {result['metrics']}")


if __name__ == "__main__":
    compilation_cache.enable()
    cli.run_absl(main)
