r"""QM9: one model per target (12 targets; R_2_Abs uses the spatial-extent head, no normalisation).

  python -m experiments.finetune --config=configs/finetune/qm9.py:U_0,jmp_s --config.data.dir=DATA \
      --init=CHECKPOINT --workdir=workdir/qm9
  python -m experiments.finetune --config=configs/finetune/qm9.py:U_0,jmp_l --config.data.dir=DATA --init=scratch
  python -m experiments.finetune --config=configs/finetune/qm9.py:mu,demo --config.data.dir=DATA --init=scratch

Variant and every knob: configs/finetune/common.py.
"""
from configs.finetune import common


def get_config(variant: str = ""):
    return common.get_config("qm9", variant)
