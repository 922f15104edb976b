r"""MatBench: the 8 regression tasks (mean reduction; phonons max) and mp_is_metal (sum-reduced logits,
2-class weighted cross-entropy, input dropout 0.5), on the official folds.

  python -m experiments.finetune --config=configs/finetune/matbench.py:mp_gap,fold0,jmp_s --config.data.dir=DATA \
      --init=CHECKPOINT --workdir=workdir/matbench
  python -m experiments.finetune --config=configs/finetune/matbench.py:mp_is_metal,fold3,jmp_l --config.data.dir=DATA --init=scratch
  python -m experiments.finetune --config=configs/finetune/matbench.py:log_kvrh,fold0,demo --config.data.dir=DATA --init=scratch

Variant and every knob: configs/finetune/common.py.
"""
from configs.finetune import common


def get_config(variant: str = ""):
    return common.get_config("matbench", variant)
