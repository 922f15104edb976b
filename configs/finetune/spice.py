r"""SPICE: gradient forces on the dipeptides / solvated_amino_acids subsets (prepared from
spice_dipeptides.h5 / spice_solvated_amino_acids.h5, so the shards are named spice_<subset>).

  python -m experiments.finetune --config=configs/finetune/spice.py:dipeptides,jmp_s --config.data.dir=DATA \
      --init=CHECKPOINT --workdir=workdir/spice
  python -m experiments.finetune --config=configs/finetune/spice.py:solvated_amino_acids,jmp_l --config.data.dir=DATA --init=scratch
  python -m experiments.finetune --config=configs/finetune/spice.py:dipeptides,demo --config.data.dir=DATA --init=scratch

Variant and every knob: configs/finetune/common.py.
"""
from configs.finetune import common


def get_config(variant: str = ""):
    return common.get_config("spice", variant)
