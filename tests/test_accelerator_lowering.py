"""The pre-training and fine-tuning steps lower, and export (`jax.export`), for GPU and TPU from this CPU host.

Nothing CPU-only may leak into an accelerator program: no host callbacks, no custom calls, and none of the
CPU fusion barriers (`kernels.fusion_barrier`, a conditional per barrier), which choose by the platform being
lowered for, not by the host's backend. Lowering traces with abstract shapes only, so nothing runs.
"""
from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import molecule

from configs.finetune import rmd17
from jmp_jax import program_store
from jmp_jax.finetune import loop as finetune_loop
from jmp_jax.finetune import optim as finetune_optim
from jmp_jax.finetune.loss import Normalization
from jmp_jax.finetune.model import FinetuneModel, backbone_for
from jmp_jax.graph import batching
from jmp_jax.models import kernels
from jmp_jax.models.config import demo
from jmp_jax.models.jmp import JMPModel, variable_shapes
from jmp_jax.graph.batching import bucketed_budgets
from jmp_jax.pretrained import build_graphs
from jmp_jax.training import optim
from jmp_jax.data.types import TaskNormalization
from jmp_jax.data.types import LabeledBatch
from jmp_jax.training.state import init_train_state
from jmp_jax.training.train_step import train_step

ACCELERATORS = ("cuda", "tpu")
ONE_BLOCK = dataclasses.replace(demo(), num_blocks=1)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def _labeled_batch(shard_axis: bool):
    graphs = build_graphs([molecule("CH3CH2OH")])
    budgets = bucketed_budgets(graphs)
    labels = LabeledBatch(graphs=batching.collate(graphs, budgets), energy=np.zeros(budgets.graphs, np.float32),
                          forces=np.zeros((budgets.nodes, 3), np.float32),
                          task=np.zeros(budgets.graphs, np.int32) if shard_axis else None)
    return _abstract(jax.tree.map(lambda x: np.asarray(x)[None] if shard_axis else np.asarray(x), labels))


def _pretrain_step_and_args():
    model = JMPModel(ONE_BLOCK, num_tasks=2)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variable_shapes(ONE_BLOCK, 2))
    tx, schedule = optim.pretrain_optimizer(zeros["params"], num_blocks=1, peak_lr=1e-4, warmup_steps=1,
                                            total_steps=10)
    state = jax.eval_shape(lambda: init_train_state(zeros, tx))
    # The default pre-training step: mixed-task batches, each structure with its own task's head and scales.
    step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, task=None,
                             norm=(TaskNormalization(1.0, 1.0), TaskNormalization(2.0, 0.5)), ema_decay=0.99)
    return step, (state, _labeled_batch(shard_axis=True))


def _finetune_step_and_args():
    config = rmd17.get_config("ethanol,demo")
    spec = finetune_loop.head_spec(config.task)
    model = FinetuneModel(backbone_for(ONE_BLOCK, spec), spec)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), _concrete_batch(), train=False))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    tx, _ = finetune_optim.finetune_optimizer(zeros["params"], finetune_loop.optim_config(config, 1, 10), 1)
    state = jax.eval_shape(lambda: init_train_state(zeros, tx, ema=False))
    step = functools.partial(finetune_loop.train_step, model=model, tx=tx, norm=Normalization(force_std=0.5))
    batch = _labeled_batch(shard_axis=True).replace(task=None)
    args = (state, batch, jax.ShapeDtypeStruct((1,), jnp.float32), jax.eval_shape(lambda: jax.random.key(1)),
            jax.ShapeDtypeStruct((), jnp.float32))
    return step, args


def _concrete_batch():
    graphs = build_graphs([molecule("CH3CH2OH")])
    return batching.collate(graphs, bucketed_budgets(graphs))


def _lowered_text(step, args, platform: str) -> str:
    return jax.jit(step).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _fusion_barriers(text: str) -> int:
    """Conditionals that compute the identity two ways: `fusion_barrier`'s signature."""
    return len(re.findall(r"stablehlo\.is_finite", text))


@pytest.fixture(scope="module", params=["pretrain", "finetune"])
def step_and_args(request):
    return {"pretrain": _pretrain_step_and_args, "finetune": _finetune_step_and_args}[request.param]()


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_training_steps_export_for_accelerators_without_cpu_parts(step_and_args, platform):
    """Exported as the traced-program store (jmp_jax.program_store) does on a GPU or TPU host: flattened,
    through jax.export, serialized and read back."""
    step, args = step_and_args
    leaves, treedef = jax.tree.flatten(args)
    exported, _ = program_store.export_flat(step, treedef, leaves, platforms=(platform,))
    restored = jax.export.deserialize(exported.serialize())
    assert restored.platforms == (platform,) and restored.in_avals == exported.in_avals
    text = str(exported.mlir_module())
    assert "custom_call" not in text and "callback" not in text.lower()
    # The step's own finiteness guard (loss, gradient norm) is all that is left of is_finite.
    assert _fusion_barriers(text) <= 2
    assert _fusion_barriers(_lowered_text(step, args, "cpu")) > 10  # the barriers are there on CPU


def test_fusion_barrier_follows_the_lowering_platform():
    x = jax.ShapeDtypeStruct((8,), jnp.float32)
    lowered = {platform: _lowered_text(kernels.fusion_barrier, (x,), platform) for platform in ("cpu",) + ACCELERATORS}
    assert _fusion_barriers(lowered["cpu"]) == 1
    assert all(_fusion_barriers(lowered[p]) == 0 for p in ACCELERATORS)
    np.testing.assert_array_equal(jax.jit(kernels.fusion_barrier)(jnp.arange(8.0)), np.arange(8.0))
