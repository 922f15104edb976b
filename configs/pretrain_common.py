"""Pieces shared by the JMP-S and JMP-L pre-training configs (the recipe of docs/jmp_spec.md §3)."""
from __future__ import annotations

import ml_collections

from jmp_jax.tasks import DEFAULT_TASKS, JMP_TASKS

def pretrain_config(model: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.backbone = model             # a name in models.config.NAMED_CONFIGS | path to a JMP BackboneConfig JSON
    c.model.dtype = "float32"            # "bfloat16": bf16 compute, float32 parameters and geometry
    c.model.matmul_precision = "float32"  # "bfloat16": bf16 matrix-product operands, float32 accumulation
    c.model.scale_factors = "fitted"     # "fitted": JMP's released scale file for this size; "none": all 1
    c.model.scan_blocks = False          # True: one compiled interaction block (jax.lax.scan); slower to compile on CPU
    c.model.remat = "block"              # block: recompute each block in the backward pass (less memory) | nested
                                         # (its interactions too: less again, slower) | products (recompute
                                         # all but the wide products: faster, more memory) | none

    c.data = ml_collections.ConfigDict()
    c.data.dir = ml_collections.FieldReference(None, field_type=str)  # None: the embedded default dataset
    c.data.default_dataset_size = "full"  # full | small (embedded default only)
    c.data.tasks = [dict(t) for t in DEFAULT_TASKS]
    c.data.train_split = "train"
    c.data.val_split = "val"
    c.data.temperature = 2.0             # task mixing p_i ∝ n_i^(1/T)
    # "batch" (JMP's): every batch packs structures drawn from the temperature-mixed union of the tasks,
    # each with its own task's head and loss scales, in shapes planned on the mixture.
    # "step": one task per step, each task in its own shapes (one compiled step per task and shape).
    c.data.task_mixing = "batch"
    c.data.edge_dropout = 0.1            # a2a edges dropped before sub-selecting main/a2ee2a/qint (training only)
    c.data.structures_per_batch = 4      # per batch shard: JMP trains with 4 structures per GPU
    c.data.num_batch_shards = 1          # batches per step (a multiple of the device count)
    c.data.num_workers = 2               # host threads building graphs
    c.data.prefetch = 2                  # batches prepared ahead of the device

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 200_000
    c.train.lr = 3e-4                    # AdamW peak learning rate
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.weight_decay = 0.1           # applied to every parameter, as JMP does
    c.train.warmup_steps = 2000          # linear from 0.2*lr ...
    c.train.warmup_start_factor = 0.2
    c.train.min_lr_factor = 0.1          # ... then cosine down to 0.1*lr at num_steps
    c.train.clip_norm = 1.0              # global norm, after the shared-basis gradient division
    c.train.ema_decay = 0.99
    c.train.max_nonfinite_in_a_row = 10  # consecutive skipped (non-finite) updates before the run stops

    c.log = ml_collections.ConfigDict()
    c.log.every = 50                     # steps between metric lines (jsonl + TensorBoard)
    c.log.eval_every = 2000              # steps between validations on every task
    c.log.eval_batches = 20              # batches per task per validation
    c.log.checkpoint_every = 1000
    c.log.keep_checkpoints = 3

    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1                      # devices that share each parameter (1 = pure data parallel)
    return c


def use_jmp_data(c: ml_collections.ConfigDict, data_dir: str) -> None:
    """Trains on prepared OC20/OC22/ANI-1x/Transition-1x shards (data_prep.build) in `data_dir`."""
    c.data.dir = data_dir
    c.data.tasks = [dict(t) for t in JMP_TASKS]


def make_demo(c: ml_collections.ConfigDict) -> None:
    """A short but real run on 2 CPU cores: narrow backbone, small default dataset, few steps."""
    c.model.backbone = "demo"
    c.model.scale_factors = "none"
    c.data.default_dataset_size = "small"
    c.data.structures_per_batch = 4
    c.train.num_steps = 60
    c.train.warmup_steps = 10
    c.train.lr = 1e-3
    c.log.every = 10
    c.log.eval_every = 30
    c.log.eval_batches = 2
    c.log.checkpoint_every = 30


def make_test(c: ml_collections.ConfigDict) -> None:
    """The system tests' run: the demo model with one block on two tasks with sparse graphs, 4 batch shards, a
    metric line every step."""
    make_demo(c)
    c.model.backbone = "demo_one_block"
    # 8 neighbours per atom instead of 30: these runs test the training loop, not the model's accuracy, and
    # their steps run 3-4x faster (the quadruplets of a 12 Å slab graph grow with the square of the cap).
    c.data.tasks = [dict(t, max_neighbors=8) for t in DEFAULT_TASKS[:2]]
    c.data.structures_per_batch = 1
    c.data.num_batch_shards = 4
    c.train.num_steps = 8
    c.train.warmup_steps = 3
    c.train.ema_decay = 0.5              # so that 8 steps visibly move the validated (EMA) weights
    c.log.every = 1
    c.log.eval_every = 1000
    c.log.eval_batches = 1
    c.log.checkpoint_every = 4


def get_config_for(model: str, variant: str) -> ml_collections.ConfigDict:
    c = pretrain_config(model)
    if variant == "demo":
        make_demo(c)
    elif variant == "test":
        make_test(c)
    elif variant == "jmp":
        use_jmp_data(c, data_dir="")
    elif variant:
        raise ValueError(f"unknown config variant {variant!r} (use '', 'demo', 'test' or 'jmp')")
    return c
