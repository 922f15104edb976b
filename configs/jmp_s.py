r"""JMP-S multi-task pre-training (GemNet-OC base, 44.1M parameters with the 4 pre-training heads).

  python -m experiments.pretrain --config=configs/jmp_s.py --workdir=workdir/jmp_s
  python -m experiments.pretrain --config=configs/jmp_s.py:demo --workdir=workdir/demo   # 2 CPU cores, minutes
  python -m experiments.pretrain --config=configs/jmp_s.py:jmp --config.data.dir=DATA --workdir=workdir/jmp_s

Variants: "" trains on the embedded default dataset (built on first use), "demo" is a short run of a
narrow model on a small default dataset, "jmp" uses the OC20/OC22/ANI-1x/Transition-1x shards in
`--config.data.dir` with JMP's exact task settings. Every knob is commented in pretrain_common.py.
"""
from configs import pretrain_common


def get_config(variant: str = ""):
    return pretrain_common.get_config_for("jmp_s", variant)
