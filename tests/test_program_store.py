"""`jmp_jax.program_store`: a stored program computes what `jax.jit` does (donation and shardings
included), a later process reads it back without tracing, every part of the key traces again, and a bad
file is reported and replaced, never used."""
import typing

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jmp_jax import program_store


class Moments(typing.NamedTuple):
    mu: dict
    count: jax.Array


@flax.struct.dataclass
class State:
    params: dict
    moments: Moments
    ema: typing.Any  # None in some runs


def make_state(ema: bool = True, width: int = 3) -> State:
    params = {"w": jnp.arange(2.0 * width).reshape(2, width), "b": jnp.ones(width)}
    return State(params=params, moments=Moments(jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32)),
                 ema=jax.tree.map(jnp.array, params) if ema else None)


def update(state: State, grads: dict, scale: jax.Array):
    mu = jax.tree.map(lambda m, g: 0.9 * m + g, state.moments.mu, grads)
    params = jax.tree.map(lambda p, m: p - scale * m, state.params, mu)
    ema = None if state.ema is None else jax.tree.map(lambda e, p: 0.5 * (e + p), state.ema, params)
    new = State(params=params, moments=Moments(mu, state.moments.count + 1), ema=ema)
    return new, {"norm": jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))}


GRADS = {"w": jnp.full((2, 3), 0.5), "b": jnp.arange(3.0)}


@pytest.fixture
def options():
    mesh = jax.make_mesh((1,), ("data",))
    replicated = NamedSharding(mesh, P())
    return dict(in_shardings=(replicated, replicated, replicated), out_shardings=(replicated, replicated),
                donate_argnums=0)


def stored(directory, options, key=("config", 1), traces=None):
    """`update` in a store; `traces` counts its tracings (its Python body runs only then)."""
    def counted(*args):
        traces.append(1)
        return update(*args)
    return program_store.StoredJit(counted if traces is not None else update, name="update", key=key,
                                   directory=str(directory), **options)


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_computes_what_jit_does_and_a_later_process_reads_it_without_tracing(tmp_path, options):
    expected = jax.jit(update, **options)(make_state(), GRADS, jnp.float32(0.1))
    traces = []
    first = stored(tmp_path, options, traces=traces)
    state = make_state()
    out = first(state, GRADS, jnp.float32(0.1))
    assert_same(out, expected)
    assert state.params["w"].is_deleted() and not GRADS["w"].is_deleted(), "the state is donated, as with jit"
    assert_same(first(make_state(), GRADS, jnp.float32(0.1)), expected)
    assert len(traces) == 1 and len(list(tmp_path.iterdir())) == 1

    later = stored(tmp_path, options, traces=traces)  # as a restarted process builds it
    assert_same(later(make_state(), GRADS, jnp.float32(0.1)), expected)
    assert len(traces) == 1, "read back, not traced again"
    # A state with no EMA is another tree: its own program, also equal to jit's.
    assert_same(later(make_state(ema=False), GRADS, jnp.float32(0.1)),
                jax.jit(update, **options)(make_state(ema=False), GRADS, jnp.float32(0.1)))
    assert len(traces) == 2 and len(list(tmp_path.iterdir())) == 2


def test_every_part_of_the_key_traces_again(tmp_path, options, monkeypatch):
    traces = []
    stored(tmp_path, options, traces=traces)(make_state(), GRADS, jnp.float32(0.1))
    stored(tmp_path, options, key=("config", 2), traces=traces)(make_state(), GRADS, jnp.float32(0.1))
    assert len(traces) == 2
    wider = {"w": jnp.ones((2, 4)), "b": jnp.ones(4)}
    assert_same(stored(tmp_path, options, traces=traces)(make_state(width=4), wider, jnp.float32(0.1)),
                jax.jit(update, **options)(make_state(width=4), wider, jnp.float32(0.1)))
    assert len(traces) == 3
    with jax.default_matmul_precision("bfloat16"):
        stored(tmp_path, options, traces=traces)(make_state(), GRADS, jnp.float32(0.1))
    assert len(traces) == 4
    with jax.numpy_rank_promotion("warn"):  # any of jax's global settings
        stored(tmp_path, options, traces=traces)(make_state(), GRADS, jnp.float32(0.1))
    assert len(traces) == 5
    monkeypatch.setattr(program_store, "code_fingerprint", lambda: "other code")
    stored(tmp_path, options, traces=traces)(make_state(), GRADS, jnp.float32(0.1))
    assert len(traces) == 6 and len(list(tmp_path.iterdir())) == 6


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_bad_file_is_reported_traced_again_and_replaced(tmp_path, options, capsys, damage):
    expected = jax.jit(update, **options)(make_state(), GRADS, jnp.float32(0.1))
    traces = []
    stored(tmp_path, options, traces=traces)(make_state(), GRADS, jnp.float32(0.1))
    (path,) = tmp_path.iterdir()
    data = path.read_bytes()
    if damage == "flip":
        data = data[:-100] + bytes([data[-100] ^ 1]) + data[-99:]
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = b"something else entirely"
    path.write_bytes(data)
    capsys.readouterr()
    assert_same(stored(tmp_path, options, traces=traces)(make_state(), GRADS, jnp.float32(0.1)), expected)
    warning = capsys.readouterr().err
    assert len(traces) == 2 and str(path) in warning and warning.count("\n") == 1, warning
    stored(tmp_path, options, traces=traces)(make_state(), GRADS, jnp.float32(0.1))
    assert len(traces) == 2 and not capsys.readouterr().err, "the replaced file reads back"


def test_keeps_the_newest_files(tmp_path, options, monkeypatch):
    monkeypatch.setattr(program_store, "KEEP_NEWEST", 2)
    for key in range(3):
        stored(tmp_path, options, key=key)(make_state(), GRADS, jnp.float32(0.1))
    assert len(list(tmp_path.iterdir())) == 2


def test_off_is_jax_jit(options):
    program_store.enable(None)
    assert not isinstance(program_store.jit(update, name="update", key=0, **options), program_store.StoredJit)


def test_broadcast_prefix_gives_one_entry_per_leaf():
    tree = ({"a": 1, "b": (2, 3)}, None, 4)
    assert program_store.broadcast_prefix(("x", "y", "z"), tree) == ["x", "x", "x", "z"]
    assert program_store.broadcast_prefix(({"a": "p", "b": "q"}, None, "z"), tree) == ["p", "q", "q", "z"]


def test_unwritable_store_warns_and_runs(tmp_path, options, capsys):
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("")
    expected = jax.jit(update, **options)(make_state(), GRADS, jnp.float32(0.1))
    assert_same(stored(blocked, options)(make_state(), GRADS, jnp.float32(0.1)), expected)
    warning = capsys.readouterr().err
    assert "traced program not stored" in warning and str(blocked) in warning and warning.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["not_a_folder"], "no temporary file left behind"


def test_program_that_cannot_be_exported_runs_with_jit(tmp_path, capsys):
    def with_host_callback(x):  # host callbacks hold a Python function: jax.export cannot serialize them
        return jax.pure_callback(lambda v: np.asarray(v) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x) + 1

    program = program_store.StoredJit(with_host_callback, name="callback", key=0, directory=str(tmp_path))
    np.testing.assert_array_equal(program(jnp.arange(3.0)), [1.0, 3.0, 5.0])
    np.testing.assert_array_equal(program(jnp.arange(3.0)), [1.0, 3.0, 5.0])
    warning = capsys.readouterr().err
    assert "callback not stored" in warning and warning.count("\n") == 1, warning
    assert not list(tmp_path.iterdir())
