r"""Fine-tunes JMP on one task and reports its test metrics with the best validation checkpoint.

  python -m experiments.finetune --config=configs/finetune/rmd17.py:ethanol,jmp_s --config.data.dir=DATA \
      --init=workdir/jmp_s --workdir=workdir/ft_rmd17_ethanol
  python -m experiments.finetune --config=configs/finetune/qm9.py:U_0,jmp_l --config.data.dir=DATA \
      --init=jmp-l-orbax --noinit.ema --workdir=workdir/ft_qm9_U_0
  python -m experiments.finetune --config=configs/finetune/rmd17.py:ethanol,demo --config.data.dir=DATA \
      --init=scratch --workdir=workdir/ft_demo

--init: "scratch" (random weights, the paper's GemNet-OC baseline) or a checkpoint: a pre-training
workdir / checkpoints dir, or a converted JMP checkpoint (python -m jmp_jax.convert).
--init.ema (default true): use the checkpoint's EMA weights when it has them.
"""
from jmp_jax import cli, compilation_cache

cli.quiet_startup()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jmp_jax.finetune import loop  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/finetune/<dataset>.py:<variant>")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/finetune", "metrics.jsonl, best checkpoint, results.json")
_INIT = flags.DEFINE_string("init", "scratch", "'scratch' or a pre-training / converted JMP checkpoint path")
_INIT_EMA = flags.DEFINE_bool("init.ema", True, "initialise from the checkpoint's EMA weights when present")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = loop.run(_CONFIG.value, _WORKDIR.value, init=_INIT.value, init_ema=_INIT_EMA.value)
    metrics = ", ".join(f"{k} {v:.6g}" for k, v in result["test"].items())
    print(f"{result['task']}: test {metrics}  (best epoch {result['best_epoch']} of {result['epochs']}, "
          f"val {result['primary_metric']} {result['val'].get(result['primary_metric'], float('nan')):.6g})\n"
          f"  best checkpoint: {result['best_checkpoint']}\n  metrics:         {result['metrics']}")


if __name__ == "__main__":
    compilation_cache.enable()
    cli.run_absl(main)
