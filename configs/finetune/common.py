"""The table of every JMP fine-tuning task and the recipe shared by all of them (docs/jmp_spec.md §4).

Values follow JMP's sweep file `config/all-jmp-l-configs.py` (normalisation, batch sizes, heads,
reductions, schedules, stopping) and the task modules `src/jmp/tasks/finetune/*.py` (graph settings).

JMP-S values that are not JMP's own: JMP released fine-tuning configs for JMP-L only (JMP issue #5 asks
for JMP-S's). The JMP-S variants use the GemNet-OC base backbone with its fitted scale factors (JMP's
own), JMP-L's values for everything else (learning rate, schedules, batch sizes, heads), and one value of
our own: the per-block LR profile `JMP_S_BLOCK_LR_MULTIPLIERS`, because JMP-L's 6 per-block multipliers
do not fit JMP-S's 4 blocks.

Variants (`--config=configs/finetune/<dataset>.py:<task>[,fold<k>][,<size>]`): <task> picks the row
(QM9 target, molecule, subset, MatBench task; QMOF has one), fold<k> the MatBench fold (default 0),
<size> one of jmp_l (default), jmp_s or demo (a narrow 2-block model and a 3-epoch schedule for CPU runs).
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

SIZES = ("jmp_l", "jmp_s", "demo")

# QM9 (PyG units, per-element references subtracted for ZPVE..c_v): (mean, std); R² is not normalised.
QM9_NORMALIZATION = {
    "mu": (2.674587, 1.5054824), "alpha": (75.31013, 8.164021), "eps_HOMO": (-6.5347567, 0.59702325),
    "eps_LUMO": (0.323833, 1.273586), "delta_eps": (6.8585854, 1.283122), "R_2_Abs": (0.0, 1.0),
    "ZPVE": (-0.00052343315, 0.04904531), "U_0": (0.0028667436, 1.0965848), "U": (0.0028711546, 1.0941933),
    "H": (0.0029801112, 1.0942822), "G": (0.000976671, 1.101572), "c_v": (-0.005799451, 2.2179737),
}
# Force std (eV/Å) per molecule; the energy statistics do not enter a forces-only loss.
RMD17_FORCE_STD = {
    "aspirin": 1.2733363, "azobenzene": 1.2940075, "benzene": 0.90774584, "ethanol": 1.1929188,
    "malonaldehyde": 1.302443, "naphthalene": 1.3102233, "paracetamol": 1.2707518, "salicylic": 1.3030343,
    "toluene": 1.246547, "uracil": 1.3692871,
}
# molecule: (force std, batch size, gradient forces)
MD22 = {
    "Ac-Ala3-NHMe": (1.1291506, 2, False), "DHA": (1.1258113, 1, True), "stachyose": (1.1104717, 1, True),
    "AT-AT": (1.2109985, 1, True), "AT-AT-CG-CG": (1.2021886, 1, True),
    "buckyball-catcher": (1.0899031, 1, True), "double-walled_nanotube": (1.0137014, 1, False),
}
SPICE_FORCE_STD = {"dipeptides": 0.5386545, "solvated_amino_acids": 0.81945145}
# task: (target name in the prepared records, batch size, reduction). all-jmp-l-configs.py sets "mean" (phonons
# "max") as the *scalar* reduction only; mp_is_metal is a classification target, which keeps JMP's classification
# default "sum" (`graph_classification_reduction_default`, src/jmp/tasks/finetune/base.py:435).
MATBENCH = {
    "mp_is_metal": ("is_metal", 3, "sum"), "jdft2d": ("exfoliation_en", 3, "mean"),
    "phonons": ("last_phdos_peak", 8, "max"), "dielectric": ("n", 8, "mean"),
    "log_gvrh": ("log10_g_vrh", 8, "mean"), "log_kvrh": ("log10_k_vrh", 8, "mean"),
    "perovskites": ("e_form", 8, "mean"), "mp_gap": ("gap_pbe", 2, "mean"), "mp_e_form": ("e_form", 6, "mean"),
}
# (mean, std) per fold 0..4
MATBENCH_NORMALIZATION = {
    "jdft2d": ((110.63706001904778, 132.02502987887982), (100.05996525195053, 114.26362221432791),
               (101.59535193788061, 112.45760038504558), (99.43551549230911, 109.9220303290942),
               (95.50851385805468, 76.27587565670332)),
    "phonons": ((602.9007780432183, 471.03858838413055), (613.7996473907606, 486.75099875453213),
                (619.3868976573087, 495.2975486965762), (609.7402387661577, 462.3438660855412),
                (595.4547502676089, 476.8567310885976)),
    "dielectric": ((2.417849270334958, 2.208662738016193), (2.3716402963883074, 2.1271523121706912),
                   (2.354418196731436, 1.5712251872961516), (2.392308273978868, 2.0724149898647544),
                   (2.3891527750974495, 2.011348533899877)),
    "log_gvrh": ((1.5557434474198688, 0.37307197984408746), (1.5584101768747889, 0.36743473539736493),
                 (1.55746252819908, 0.36800038945046654), (1.5543022349873286, 0.3684552493569905),
                 (1.5595705795473838, 0.37039750391284176)),
    "log_kvrh": ((1.880001033036957, 0.36820395518377785), (1.883820392919235, 0.3679308395031994),
                 (1.883778380784775, 0.3724392829717956), (1.8828457515367547, 0.3731179944882516),
                 (1.8862681006404232, 0.3671596024523317)),
    "perovskites": ((1.4726657310327749, 0.7384309800882398), (1.4690728968876414, 0.736635027626099),
                    (1.4702980269132337, 0.7456716470700677), (1.46773815420175, 0.7431740904365189),
                    (1.478002311375268, 0.7435117654840315)),
    "mp_gap": ((1.236432240252091, 1.6096424425437108), (1.2345678083402052, 1.6044708412420103),
               (1.2352391374131229, 1.6058092380465256), (1.230066812934386, 1.6003749533498033),
               (1.2350543114618917, 1.6035590734723943)),
    "mp_e_form": ((-1.4371594843879998, 1.1577096884761835), (-1.4372781184639032, 1.1576872656463288),
                  (-1.4353308741245294, 1.1568986659292604), (-1.4337824626302396, 1.1570679204976484),
                  (-1.437067044514929, 1.1567267481888575)),
}
MP_IS_METAL_CLASS_WEIGHTS = (1.0, 1.34219693)
# NOT JMP's values: JMP-S's per-block LR multipliers (blocks_0..blocks_3). JMP's profile is JMP-L's 6 values
# (0.55, 0.40, 0.30, 0.40, 0.55, 0.625; config/all-jmp-l-configs.py:121-132) and JMP released none for JMP-S's
# 4 blocks. These are JMP-L's profile linearly resampled to 4 blocks (`jmp_jax.finetune.optim.
# block_lr_multipliers(4)`): the same first and last rate and the lower rates mid-stack, no new tuning.
JMP_S_BLOCK_LR_MULTIPLIERS = (0.55, 0.333333, 0.45, 0.625)
QMOF_NORMALIZATION = (2.1866251527, 1.175752521125648)


def base_task() -> dict:
    """Every task field with its default (None = taken from the prepared split's metadata)."""
    return dict(name="", source="", kind="scalar", target="", head="mlp", reduction="sum", num_classes=0,
                dropout=0.0, class_weights=(), gradient_forces=True, normalize=True,
                target_mean=config_dict.placeholder(float), target_std=config_dict.placeholder(float),
                force_std=config_dict.placeholder(float), loss_coefficient=1.0, cutoff=12.0, max_neighbors=30,
                pbc=False, conditional_max_neighbors=False, batch_size=1)


def forces_task(name: str, source: str, force_std: float, cutoff: float, max_neighbors: int, batch_size: int,
                gradient: bool = True) -> dict:
    """JMP model_type="forces": only the force loss (coefficient 100) is trained."""
    return dict(base_task(), name=name, source=source, kind="forces", target="", gradient_forces=gradient,
                force_std=force_std, loss_coefficient=100.0, cutoff=cutoff, max_neighbors=max_neighbors,
                batch_size=batch_size)


def task_row(dataset: str, key: str, fold: int) -> dict:
    """One task of the table."""
    if dataset == "qm9":
        mean, std = QM9_NORMALIZATION[key]
        spatial = key == "R_2_Abs"
        return dict(base_task(), name=f"qm9_{key}", source="qm9", target=key, target_mean=mean, target_std=std,
                    head="spatial_extent" if spatial else "mlp", normalize=not spatial, cutoff=8.0, batch_size=48)
    if dataset == "rmd17":
        return forces_task(f"rmd17_{key}", f"rmd17_{key}", RMD17_FORCE_STD[key], 7.0, 100, 1)
    if dataset == "md22":
        std, batch, gradient = MD22[key]
        return forces_task(f"md22_{key}", f"md22_{key}", std, 12.0, 30, batch, gradient)
    if dataset == "spice":
        return forces_task(f"spice_{key}", f"spice_{key}", SPICE_FORCE_STD[key], 12.0, 30, 2)
    if dataset == "matbench":
        target, batch, reduction = MATBENCH[key]
        row = dict(base_task(), name=f"matbench_{key}_fold{fold}", source=f"matbench_{key}_fold{fold}",
                   target=target, reduction=reduction, pbc=True, conditional_max_neighbors=True, batch_size=batch)
        if key == "mp_is_metal":
            return dict(row, kind="classification", num_classes=2, dropout=0.5,
                        class_weights=MP_IS_METAL_CLASS_WEIGHTS, normalize=False)
        mean, std = MATBENCH_NORMALIZATION[key][fold]
        return dict(row, target_mean=mean, target_std=std)
    if dataset == "qmof":
        mean, std = QMOF_NORMALIZATION
        return dict(base_task(), name="qmof", source="qmof", target="bandgap", reduction="mean", target_mean=mean,
                    target_std=std, cutoff=19.0, pbc=True, conditional_max_neighbors=True, batch_size=4)
    raise ValueError(f"unknown fine-tuning dataset {dataset!r}")


TASK_KEYS = {"qm9": tuple(QM9_NORMALIZATION), "rmd17": tuple(RMD17_FORCE_STD), "md22": tuple(MD22),
             "spice": tuple(SPICE_FORCE_STD), "matbench": tuple(MATBENCH), "qmof": ("qmof",)}


def parse_variant(dataset: str, variant: str) -> tuple[str, int, str]:
    """'<task>[,fold<k>][,<size>]' -> (task key, fold, size)."""
    key, fold, size = ("qmof" if dataset == "qmof" else None), 0, "jmp_l"
    for token in filter(None, (t.strip() for t in variant.split(","))):
        if token in SIZES:
            size = token
        elif token.startswith("fold") and token[4:].isdigit() and dataset == "matbench":
            fold = int(token[4:])
        elif token in TASK_KEYS[dataset]:
            key = token
        else:
            raise ValueError(f"config variant token {token!r} for {dataset}: expected one of "
                             f"{TASK_KEYS[dataset]}, {SIZES}" + (" or fold0..fold4" if dataset == "matbench" else ""))
    if key is None:
        raise ValueError(f"{dataset} config needs a task in the variant, one of {TASK_KEYS[dataset]}")
    if not 0 <= fold < 5:
        raise ValueError(f"MatBench fold must be 0..4, got {fold}")
    return key, fold, size


def get_config(dataset: str, variant: str) -> ml_collections.ConfigDict:
    key, fold, size = parse_variant(dataset, variant)
    row = task_row(dataset, key, fold)
    c = ml_collections.ConfigDict()
    c.seed = 42                            # JMP: FinetuneConfigBase.set_seed(42)

    c.model = ml_collections.ConfigDict()
    c.model.backbone = size                # jmp_s | jmp_l | demo
    c.model.dtype = "float32"              # JMP trains some tasks in fp16-mixed; "bfloat16" is the JAX analogue
    c.model.matmul_precision = "float32"   # "bfloat16": bf16 matrix-product operands, float32 accumulation
    c.model.scale_factors = "fitted"       # for --init=scratch: JMP's fitted values ("none": all 1)
    c.model.scan_blocks = False            # True: one compiled interaction block (jax.lax.scan); slower to compile on CPU
    c.model.remat = "block"                # block: recompute each block in the backward pass (a third of the memory)
                                           # | nested (its interactions too: less again, slower) | none

    c.data = ml_collections.ConfigDict()
    c.data.dir = config_dict.placeholder(str)  # folder with the task's data_prep.build shards
    c.data.batch_size = row.pop("batch_size")
    c.data.train_split, c.data.val_split, c.data.test_split = "train", "val", "test"
    c.data.num_workers = 2
    # Batch shards per step, `batch_size` structures each (JMP's per-device batch size, as under DDP);
    # 0: one per device. A multiple of the device count; results do not depend on how many devices share them.
    c.data.num_batch_shards = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.fsdp = 1                        # devices sharing each parameter (the rest are data parallel)

    c.task = ml_collections.ConfigDict(row)

    is_rmd17 = dataset == "rmd17"
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 8e-5                      # all-jmp-l-configs.py (src/jmp/configs/finetune uses 5e-6)
    c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay = 0.9, 0.95, 1e-8, 0.1
    c.optim.clip_value = 1.0               # gradient clipping by value
    c.optim.embedding_multiplier = 0.3
    # () = JMP-L's profile: JMP's own 6 values for jmp_l, resampled to the depth for demo
    c.optim.block_multipliers = JMP_S_BLOCK_LR_MULTIPLIERS if size == "jmp_s" else ()
    c.optim.warmup_epochs = 5.0            # linear from warmup_start_factor x lr
    c.optim.warmup_start_factor = 0.1
    c.optim.cosine_epochs = 32.0           # end of the cosine (warm-up included), then ReduceLROnPlateau
    c.optim.min_lr_factor = 0.1
    c.optim.plateau_factor = 0.8
    c.optim.plateau_patience = 10 if is_rmd17 else 3

    c.train = ml_collections.ConfigDict()
    c.train.max_epochs = 100_000 if is_rmd17 else 500
    c.train.early_stopping_patience = 1000 if is_rmd17 else 50
    c.train.early_stopping_min_delta = 1e-8
    c.train.early_stopping_min_lr = 1e-10 if is_rmd17 else 1e-8
    c.train.checkpoint_every = 500         # steps between resumable checkpoints (also at every epoch's end)
    c.train.keep_checkpoints = 2

    if size == "demo":
        c.model.scale_factors = "none"
        c.optim.lr = 5e-4
        c.optim.warmup_epochs, c.optim.cosine_epochs = 1.0, 2.0
        c.optim.plateau_patience = 0
        c.train.max_epochs = 3
    return c
