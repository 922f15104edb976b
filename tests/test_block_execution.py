"""The backbone's block execution (`BlockExecution`): scanned and rematerialised blocks compute what the
unrolled blocks compute, on the reference fixture's 2-block model with its converted weights: energies,
direct forces, every sown intermediate, and the gradients w.r.t. the parameters and the positions (the
gradient-force path)."""
from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixture_batch as fb
from jmp_jax.finetune.model import with_positions
from jmp_jax.models.gemnet import BlockExecution
from jmp_jax.models.jmp import JMPModel


def _evaluate(execution: BlockExecution) -> dict[str, np.ndarray]:
    """Outputs, intermediates and the gradients of sum(E) + sum(F^2), flattened to {name: array}."""
    config, batch = fb.load_config(), fb.load_batch()
    variables = fb.load_variables(np.float32)
    model = JMPModel(config, num_tasks=1, execution=execution)

    def loss(params, positions):
        # Without and with the intermediates collection: the scan keeps the blocks' states only for the latter.
        both = {"params": params, "constants": variables["constants"]}
        moved = with_positions(batch, positions)
        out = model.apply(both, moved)
        _, state = model.apply(both, moved, mutable=["intermediates"])
        return jnp.sum(out["energy"]) + jnp.sum(out["forces"] ** 2), (out, state["intermediates"])

    (_, aux), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        variables["params"], batch.graph.nodes["positions"])
    tree = {"outputs": aux[0], "intermediates": aux[1], "param_grads": grads[0], "position_grad": grads[1]}
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# Temporaries of the gradient with recomputed blocks, as a share of those without: measured 0.74 on the
# fixture's 2-block model (the bases' share is large there), 0.32 on the JMP-S slab step; 1.0 with jax.checkpoint.
RECOMPUTED_SHARE = 0.85


@pytest.fixture(scope="module")
def unrolled():
    return _evaluate(BlockExecution(scan=False, remat="none"))


def _assert_same(got: dict, want: dict, rtol: float) -> None:
    """Equal up to the order of float32 sums, which XLA's code generator picks per program. With the suite's
    (conftest.py: the legacy fusion generator) the scanned and recomputed programs differ from the unrolled one
    by up to 1.1e-4 of a leaf's largest value (measured, the second-order position gradient; within 1e-6 and
    1e-5 with the default generator); a wrong or missing block differs by O(1)."""
    assert got.keys() == want.keys()
    for name, expected in want.items():
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
        np.testing.assert_allclose(got[name], expected, rtol=rtol, atol=rtol * scale, err_msg=name)


def test_scanned_blocks_equal_unrolled_blocks(unrolled):
    scanned = _evaluate(BlockExecution(scan=True, remat="none"))
    assert "['intermediates']['backbone']['h_block1'][0]" in scanned
    _assert_same(scanned, unrolled, rtol=2e-4)


@pytest.mark.parametrize("remat", ["block", "nested", "products"])
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_rematerialised_blocks_equal_unrolled_blocks(unrolled, scan, remat):
    # The backward pass recomputes the blocks (with "nested", within each block's backward, each of its
    # interactions again; with "products", all but the wide products); only the order of float32 sums may change.
    _assert_same(_evaluate(BlockExecution(scan=scan, remat=remat)), unrolled, rtol=2e-4)


def test_rematerialised_blocks_keep_less_for_the_backward_pass():
    """XLA's own count of the gradient program's temporaries and work: recomputed blocks must actually free
    what the forward pass kept (jax.checkpoint did not, on XLA CPU), and recomputed interactions within them
    less again; blocks recomputed around their kept products (`model.remat="products"`; few of the fixture's
    products are wide enough to keep) also free what "none" keeps, and recompute less than "block"."""
    config, batch, variables = fb.load_config(), fb.load_batch(), fb.load_variables(np.float32)

    def temporaries_and_flops(remat: str) -> tuple[int, float]:
        model = JMPModel(config, num_tasks=1, execution=BlockExecution(remat=remat))

        def loss(params):
            out = model.apply({"params": params, "constants": variables["constants"]}, batch)
            return jnp.sum(out["energy"]) + jnp.sum(out["forces"] ** 2)

        program = jax.jit(jax.grad(loss)).lower(variables["params"]).compile()
        return program.memory_analysis().temp_size_in_bytes, program.cost_analysis()["flops"]

    (kept, none_flops), (recomputed, block_flops) = temporaries_and_flops("none"), temporaries_and_flops("block")
    (nested, _), (around_products, products_flops) = temporaries_and_flops("nested"), temporaries_and_flops("products")
    assert recomputed < RECOMPUTED_SHARE * kept, (recomputed, kept)
    assert nested < recomputed, (nested, recomputed)
    assert around_products < RECOMPUTED_SHARE * kept, (around_products, kept)
    assert none_flops < products_flops < block_flops, (none_flops, products_flops, block_flops)


def test_unknown_remat_is_refused():
    with pytest.raises(ValueError, match="model.remat must be one of .* not 'sometimes'"):
        BlockExecution(remat="sometimes")


def test_alike_blocks_are_traced_once():
    """Recomputed blocks with equal configurations and input shapes share one trace (`recomputed_in_backward`):
    in the gradient's StableHLO, every function of a recomputed block (its forward, and its recomputation and
    transpose in the backward pass) is defined once and called once per block. The fixture's 2-block model
    recomputes out_blocks_0, out_blocks_1 and both interaction blocks; the last output block keeps its
    intermediates. One exception: the last interaction block's forward, whose passed-through basis
    (`gemnet.interaction_step`) no later block reads, so that jax drops that output from its call."""
    config, batch = fb.load_config(), fb.load_batch()
    variables = fb.load_variables(np.float32)
    model = JMPModel(config, num_tasks=1, execution=BlockExecution(remat="block"))
    gradient = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, batch)["energy"])))
    text = gradient.lower(variables).as_text()
    calls = collections.Counter(re.findall(r"call @(_apply\w*)\(", text))
    assert len(calls) >= 4, calls  # forward and backward functions of both kinds of block
    once = sorted(name for name, count in calls.items() if count == 1)
    assert len(once) == 2 and set(calls.values()) == {1, config.num_blocks}, calls
    signatures = [re.search(r"func.func private @%s\((.*?)\) -> \((.*?)\) \{" % name, text).groups() for name in once]
    (args_a, results_a), (args_b, results_b) = signatures
    # The same interaction block's forward, with and without the passed-through basis.
    assert abs(args_a.count("%arg") - args_b.count("%arg")) == 1, signatures
    assert abs(results_a.count("tensor<") - results_b.count("tensor<")) == 1, signatures
