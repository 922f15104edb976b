r"""QMOF band gap: mean reduction, 19 Å graphs with size-dependent neighbour caps.

  python -m experiments.finetune --config=configs/finetune/qmof.py:jmp_s --config.data.dir=DATA \
      --init=CHECKPOINT --workdir=workdir/qmof
  python -m experiments.finetune --config=configs/finetune/qmof.py:jmp_l --config.data.dir=DATA --init=scratch
  python -m experiments.finetune --config=configs/finetune/qmof.py:demo --config.data.dir=DATA --init=scratch

Variant and every knob: configs/finetune/common.py.
"""
from configs.finetune import common


def get_config(variant: str = ""):
    return common.get_config("qmof", variant)
