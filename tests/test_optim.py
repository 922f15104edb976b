import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jmp_jax.training import optim


def test_schedule_matches_jmp_closed_form():
    peak, warmup, total = 3e-4, 2000, 10_000
    schedule = optim.warmup_cosine_schedule(peak, warmup, total)
    assert float(schedule(0)) == pytest.approx(0.2 * peak)
    assert float(schedule(1999)) == pytest.approx(peak)
    assert float(schedule(1000)) == pytest.approx(peak * (0.2 + 0.8 * 1000 / 1999))
    assert float(schedule(2000)) == pytest.approx(peak)
    assert float(schedule(total)) == pytest.approx(0.1 * peak)
    mid = 2000 + (total - 2000) // 2
    assert float(schedule(mid)) == pytest.approx(0.1 * peak + 0.9 * peak / 2, rel=1e-5)


def _params():
    ones = lambda *s: jnp.ones(s)  # noqa: E731
    return {"backbone": {"bases": {"mlp_rbf_tint": {"kernel": ones(4, 2)}, "mlp_rbf_out": {"kernel": ones(4, 2)},
                                   "edge_emb": {"kernel": ones(3, 2)}},
                         "int_blocks_0": {"dense_ca": {"kernel": ones(2, 2)}}}}


def test_shared_basis_gradients_are_divided_by_block_counts():
    scales = optim.shared_basis_gradient_scales(_params(), num_blocks=4)
    assert scales["backbone"]["bases"]["mlp_rbf_tint"]["kernel"] == 0.25
    assert scales["backbone"]["bases"]["mlp_rbf_out"]["kernel"] == 0.2
    assert scales["backbone"]["bases"]["edge_emb"]["kernel"] == 1.0
    assert scales["backbone"]["int_blocks_0"]["dense_ca"]["kernel"] == 1.0


def test_division_happens_before_clipping():
    params = _params()
    grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), params)
    tx = optax.chain(optim.scale_by_tree(optim.shared_basis_gradient_scales(params, 4)),
                     optax.clip_by_global_norm(1.0))
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)
    bases = updates["backbone"]["bases"]
    ratio = bases["mlp_rbf_tint"]["kernel"] / bases["edge_emb"]["kernel"][0, 0]
    np.testing.assert_allclose(ratio, 0.25, rtol=1e-6)


def test_adamw_matches_torch_semantics_on_one_step():
    params = _params()
    tx, schedule = optim.pretrain_optimizer(params, num_blocks=4, peak_lr=1e-2, warmup_steps=10, total_steps=100)
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    lr = float(schedule(0))
    # First Adam step moves by lr * sign(g) (bias-corrected), plus decoupled decay lr * wd * p.
    expected = 1.0 - lr * 1.0 - lr * 0.1 * 1.0
    np.testing.assert_allclose(new["backbone"]["int_blocks_0"]["dense_ca"]["kernel"], expected, rtol=1e-4)


def test_ema_update():
    ema = optim.ema_update({"w": jnp.zeros(3)}, {"w": jnp.ones(3)}, 0.99)
    np.testing.assert_allclose(ema["w"], 0.01, rtol=1e-6)


def test_guarded_update_skips_non_finite_steps_and_applies_finite_ones():
    """As the loops run it (jitted, state donated): a finite step is optax's update plus the EMA; a non-finite
    loss or gradient leaves every leaf as it was and counts the skip; the next finite step resets the count."""
    from jmp_jax.training.state import guarded_update, init_train_state
    tx = optax.adamw(1e-2, weight_decay=0.1)
    step = jax.jit(lambda s, loss, g: guarded_update(s, loss, g, tx, ema_decay=0.5), donate_argnums=0)
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731 (the donated state is deleted)
    state = init_train_state({"params": _params()}, tx)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), _params())

    expected_updates, expected_opt = tx.update(grads, state.opt_state, state.params)
    expected_params = optax.apply_updates(state.params, expected_updates)
    expected_ema = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, state.ema_params, expected_params)
    first, grad_norm, finite = step(copy(state), jnp.float32(1.0), grads)
    assert bool(finite) and int(first.step) == 1 and int(first.nonfinite_in_a_row) == 0
    np.testing.assert_allclose(float(grad_norm), float(optax.tree.norm(grads)), rtol=1e-6)
    for got, want in ((first.params, expected_params), (first.opt_state, expected_opt),
                      (first.ema_params, expected_ema)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)

    nan_grads = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
    for loss, g, skipped in ((jnp.float32(jnp.inf), grads, 1), (jnp.float32(1.0), nan_grads, 2)):
        before = copy(first)
        first, _, finite = step(first, loss, g)
        assert not bool(finite) and int(first.nonfinite_in_a_row) == skipped and int(first.step) == 1
        for got, want in ((first.params, before.params), (first.opt_state, before.opt_state),
                          (first.ema_params, before.ema_params)):
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, want)
    after, _, finite = step(first, jnp.float32(1.0), grads)
    assert bool(finite) and int(after.step) == 2 and int(after.nonfinite_in_a_row) == 0
