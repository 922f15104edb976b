r"""MD22: gradient forces, except direct forces for Ac-Ala3-NHMe and double-walled_nanotube (7 molecules).

  python -m experiments.finetune --config=configs/finetune/md22.py:stachyose,jmp_s --config.data.dir=DATA \
      --init=CHECKPOINT --workdir=workdir/md22
  python -m experiments.finetune --config=configs/finetune/md22.py:Ac-Ala3-NHMe,jmp_l --config.data.dir=DATA --init=scratch
  python -m experiments.finetune --config=configs/finetune/md22.py:DHA,demo --config.data.dir=DATA --init=scratch

Variant and every knob: configs/finetune/common.py.
"""
from configs.finetune import common


def get_config(variant: str = ""):
    return common.get_config("md22", variant)
