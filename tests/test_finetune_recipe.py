"""Fine-tuning config values against the values in JMP's own configs (facebookresearch/JMP), and the
documented JMP-S values that are not JMP's."""
from configs.finetune import common
from jmp_jax.finetune import loop, optim
from jmp_jax.models.config import NAMED_CONFIGS

# config/all-jmp-l-configs.py:121-132 (make_parameter_specific_optimizer_config).
JMP_EMBEDDING_LR = 0.3
JMP_L_BLOCK_LR = (0.55, 0.40, 0.30, 0.40, 0.55, 0.625)


def test_mp_is_metal_reduces_with_jmps_classification_default():
    """all-jmp-l-configs.py sets graph_scalar_reduction_default="mean" for the scalar MatBench tasks only;
    mp_is_metal's classification target keeps graph_classification_reduction_default="sum" (base.py:435)."""
    for fold in range(5):
        task = common.get_config("matbench", f"mp_is_metal,fold{fold}").task
        assert (task.kind, task.reduction) == ("classification", "sum")
    spec = loop.head_spec(common.get_config("matbench", "mp_is_metal").task)
    assert spec.reduction == "sum"
    assert common.get_config("matbench", "phonons").task.reduction == "max"
    assert {common.get_config("matbench", k).task.reduction for k in common.MATBENCH
            if k not in ("mp_is_metal", "phonons")} == {"mean"}


def _used_multipliers(size: str) -> dict[str, float]:
    """The per-group LR multipliers a fine-tuning run builds from the config of `size`."""
    config = common.get_config("qm9", f"U_0,{size}")
    num_blocks = NAMED_CONFIGS[size]().num_blocks
    return optim.group_multipliers(loop.optim_config(config, num_blocks, steps_per_epoch=10), num_blocks)


def test_jmp_l_uses_jmps_own_lr_profile():
    assert optim.JMP_L_BLOCK_LR_MULTIPLIERS == JMP_L_BLOCK_LR
    assert _used_multipliers("jmp_l") == {"embedding": JMP_EMBEDDING_LR, optim.REST: 1.0,
                                          **{f"blocks_{i}": m for i, m in enumerate(JMP_L_BLOCK_LR)}}


def test_jmp_s_uses_the_documented_resampled_profile():
    """JMP-S's documented per-block multipliers (not JMP's) are JMP-L's profile resampled to its 4 blocks,
    and they are what a JMP-S run uses."""
    documented = common.JMP_S_BLOCK_LR_MULTIPLIERS
    assert NAMED_CONFIGS["jmp_s"]().num_blocks == len(documented) == 4
    assert documented == optim.block_lr_multipliers(4)
    assert documented[0] == JMP_L_BLOCK_LR[0] and documented[-1] == JMP_L_BLOCK_LR[-1]
    assert tuple(common.get_config("matbench", "mp_gap,jmp_s").optim.block_multipliers) == documented
    assert _used_multipliers("jmp_s") == {"embedding": JMP_EMBEDDING_LR, optim.REST: 1.0,
                                          **{f"blocks_{i}": m for i, m in enumerate(documented)}}
    assert "JMP_S_BLOCK_LR_MULTIPLIERS" in common.__doc__ and "not JMP's own" in common.__doc__
