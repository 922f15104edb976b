"""bfloat16 matrix products (`jax.default_matmul_precision("bfloat16")`): exact rounding semantics of
`bf16_matmul` and its derivative, the layers that follow the setting, shard_map, and a training step."""
import dataclasses
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import fixture_batch as fb
from jmp_jax.models.jmp import JMPModel
from jmp_jax.models.kernels import batched_matmul, bf16_matmul, matmul
from jmp_jax.models.layers import Dense

def rounded(x: jax.Array) -> jax.Array:
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def exact_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("shape", [(37, 48, 20), (37, 20, 48)])  # both transposition branches of the derivative
def test_bf16_matmul_and_its_derivative_round_operands_and_accumulate_in_float32(shape):
    m, k, n = shape
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x, w, ct = (jax.random.normal(key, s) for key, s in zip(keys, [(m, k), (k, n), (m, n)]))
    y, vjp = jax.vjp(bf16_matmul, x, w)
    dx, dw = vjp(ct)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    np.testing.assert_allclose(y, exact_dot(rounded(x), rounded(w)), atol=1e-5)
    np.testing.assert_allclose(dx, exact_dot(rounded(ct), rounded(w).T), atol=1e-5)
    np.testing.assert_allclose(dw, exact_dot(rounded(x).T, rounded(ct)), atol=1e-5)
    assert np.abs(y - exact_dot(x, w)).max() > 1e-3  # the rounding is real


def test_batched_matmul_and_its_derivative_match_jnp_matmul():
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    a, b, ct = (jax.random.normal(key, s) for key, s in zip(keys, [(6, 5, 7), (6, 7, 3), (6, 5, 3)]))
    y, vjp = jax.vjp(batched_matmul, a, b)
    want_y, want_vjp = jax.vjp(lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST), a, b)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(ct), want_vjp(ct)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _dot_operand_dtypes(fn, *args) -> set[str]:
    jaxpr = jax.make_jaxpr(fn)(*args)
    found = set()

    def visit(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "dot_general":
                found.add(str(eqn.invars[0].aval.dtype))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return found


def test_dense_products_follow_the_default_matmul_precision():
    layer = Dense(8, activation=True)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 3, 16))
    params = layer.init(jax.random.PRNGKey(2), x)
    apply = functools.partial(layer.apply, params)
    assert _dot_operand_dtypes(apply, x) == {"float32"}
    with jax.default_matmul_precision("bfloat16"):
        assert _dot_operand_dtypes(apply, x) == {"bfloat16"}
        y = apply(x)
    assert y.shape == (5, 3, 8) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, apply(x), rtol=0, atol=0.02 * float(jnp.abs(y).max()))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_dense_of_parts_equals_dense_of_their_concatenation(precision):
    """A list input stands for its concatenation: one kernel of the summed width, the same output and
    gradients (up to the order of float32 sums)."""
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    parts = [jax.random.normal(key, (11, width)) for key, width in zip(keys, (16, 8, 24))]
    layer = Dense(12, activation=True)
    params = layer.init(jax.random.PRNGKey(4), parts)
    assert params["params"]["kernel"].shape == (48, 12)

    def loss(params, parts, split):
        y = layer.apply(params, parts if split else jnp.concatenate(parts, axis=-1))
        return jnp.sum(jnp.sin(y))

    with jax.default_matmul_precision(precision):
        got = jax.grad(loss, argnums=(0, 1))(params, parts, True)
        want = jax.grad(loss, argnums=(0, 1))(params, parts, False)
        np.testing.assert_allclose(layer.apply(params, parts),
                                   layer.apply(params, jnp.concatenate(parts, axis=-1)), rtol=1e-5, atol=1e-5)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_bf16_products_inside_shard_map_sum_the_kernel_gradient_over_shards():
    """A replicated kernel times per-shard rows: the kernel's cotangent is summed over the shards."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    x = jax.random.normal(jax.random.PRNGKey(3), (4 * jax.device_count(), 16))
    x_sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data")))
    w = jax.random.normal(jax.random.PRNGKey(4), (16, 8))

    def loss(w, x):
        return jnp.sum(matmul(x, w, jnp.float32) ** 2)

    def sharded_grad(w, x):
        return jax.lax.psum(jax.grad(loss)(w, x), "data")

    with jax.default_matmul_precision("bfloat16"):
        sharded = jax.shard_map(sharded_grad, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
        per_shard = jax.jit(sharded)(w, x_sharded)
        whole = jax.grad(loss)(w, x)
    np.testing.assert_allclose(per_shard, whole, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def fixture_model():
    return JMPModel(fb.load_config(), num_tasks=1), fb.load_variables(), fb.load_batch()


def test_model_with_bf16_products_stays_close_to_the_float32_reference(fixture_model):
    """Measured on the fixture: energy and forces 6% of max off the reference (bf16 keeps 8 mantissa bits;
    full bf16 activations are ~10% off); the float32 run is within 3e-6."""
    model, variables, batch = fixture_model
    reference = fb.load_outputs()
    with jax.default_matmul_precision("bfloat16"):
        out = jax.jit(model.apply)(variables, batch)
    for name in ("energy", "forces"):
        expected = reference[f"f32.{name}"]
        actual = np.asarray(out[name])[:len(expected)]
        assert actual.dtype == np.float32 and out["force_features"].dtype == jnp.float32
        np.testing.assert_allclose(actual, expected, rtol=0, atol=0.1 * np.abs(expected).max(), err_msg=name)


def test_training_steps_with_bf16_products_lower_the_loss(fixture_model):
    from jmp_jax.training import optim
    from jmp_jax.data.types import TaskNormalization
    from jmp_jax.data.types import LabeledBatch
    from jmp_jax.training.state import init_train_state
    from jmp_jax.training.train_step import train_step

    _, _, graphs = fixture_model
    # One interaction block keeps the compile short; the block's layers are those of the full model.
    model = JMPModel(dataclasses.replace(fb.load_config(), num_blocks=1), num_tasks=1)
    variables = jax.jit(model.init)(jax.random.PRNGKey(5), graphs)
    rng = np.random.default_rng(0)
    labels = LabeledBatch(graphs=graphs, energy=rng.normal(size=graphs.num_graphs).astype(np.float32),
                          forces=rng.normal(size=(graphs.num_nodes, 3)).astype(np.float32))
    batch = jax.tree.map(lambda x: np.asarray(x)[None], labels)  # one batch shard
    tx, schedule = optim.pretrain_optimizer(variables["params"], num_blocks=model.config.num_blocks, peak_lr=1e-4,
                                            warmup_steps=1, total_steps=100)
    state = init_train_state(variables, tx)
    with jax.default_matmul_precision("bfloat16"):
        step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule, task=0,
                                         norm=TaskNormalization(1.0, 1.0), ema_decay=0.99))
        losses = []
        for _ in range(4):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses
