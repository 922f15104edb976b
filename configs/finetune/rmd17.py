r"""rMD17: forces F = -dE/dpos of a bias-free energy head, force loss only (10 molecules).

  python -m experiments.finetune --config=configs/finetune/rmd17.py:ethanol,jmp_s --config.data.dir=DATA \
      --init=CHECKPOINT --workdir=workdir/rmd17
  python -m experiments.finetune --config=configs/finetune/rmd17.py:aspirin,jmp_l --config.data.dir=DATA --init=scratch
  python -m experiments.finetune --config=configs/finetune/rmd17.py:ethanol,demo --config.data.dir=DATA --init=scratch

Variant and every knob: configs/finetune/common.py.
"""
from configs.finetune import common


def get_config(variant: str = ""):
    return common.get_config("rmd17", variant)
