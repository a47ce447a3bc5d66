"""XLA backend options per program (`evojax_nas.xla_backend`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import compiler
from jax._src.lib import xla_client

from evojax_nas import xla_backend
from evojax_nas.xla_backend import EXTRA_OPTIONS

UNROLL = "xla_cpu_disable_loop_unrolling"


def _update(w, m, g, lr):
    g = g + 1e-4 * w
    return w - lr * g - (lr * 0.9) * m, g + 0.9 * m


def test_the_message_merges_into_compile_options_and_leaves_the_original_alone():
    base = xla_client.CompileOptions()
    base.num_replicas = 3
    before = base.SerializeAsString()
    merged = xla_backend.with_extra_options(base, [UNROLL, "another_option"])
    text = merged.SerializeAsString()
    assert UNROLL.encode() in text and b"another_option" in text
    assert merged.num_replicas == 3  # the rest kept
    assert base.SerializeAsString() == before and UNROLL.encode() not in before
    assert xla_backend.with_extra_options(base, []).SerializeAsString() == before


def test_install_passes_the_key_to_the_compiler_and_nothing_else_changes(monkeypatch):
    assert xla_backend.install() and xla_backend.install()  # idempotent
    wrapped = compiler.get_compile_options
    assert wrapped.__wrapped__ is not wrapped

    def options(overrides):
        return wrapped(num_replicas=1, num_partitions=1, env_options_overrides=overrides)

    plain = wrapped.__wrapped__(num_replicas=1, num_partitions=1, env_options_overrides={})
    assert options({}).SerializeAsString() == plain.SerializeAsString()
    with_key = options({EXTRA_OPTIONS: f"{UNROLL}, "}).SerializeAsString()
    assert UNROLL.encode() in with_key and EXTRA_OPTIONS.encode() not in with_key

    # What the backend is asked to compile with, for a real program: the entry is there, the
    # results are the programs' without it, bit for bit.
    seen = []
    real = compiler.compile_or_get_cached

    def spy(backend, computation, devices, compile_options, *args, **kwargs):
        seen.append(compile_options.SerializeAsString())
        return real(backend, computation, devices, compile_options, *args, **kwargs)

    monkeypatch.setattr(compiler, "compile_or_get_cached", spy)
    shape = jax.ShapeDtypeStruct((3, 3, 7, 5), jnp.float32)
    args = [shape] * 3 + [jax.ShapeDtypeStruct((), jnp.float32)]
    values = [jnp.full(shape.shape, v, jnp.float32) for v in (0.3, -0.2, 0.7)]
    lr = jnp.float32(0.05)
    outs, asked = [], []
    for opts in ({}, {EXTRA_OPTIONS: UNROLL}):
        seen.clear()
        program = jax.jit(_update, compiler_options=opts).trace(*args).lower().compile()
        asked.append([UNROLL.encode() in s for s in seen])
        outs.append(program(*values, lr))
    assert asked == [[False], [True]]
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_without_install_xla_refuses_the_key():
    """The key is not an XLA option: without the wrapper the compile fails loudly, so a
    program can never silently compile without what it asked for."""
    original = getattr(compiler.get_compile_options, "__wrapped__", compiler.get_compile_options)
    options = original(
        num_replicas=1, num_partitions=1, env_options_overrides={EXTRA_OPTIONS: UNROLL}
    )
    lowered = jax.jit(lambda x: x * 2).lower(jnp.ones(3))
    backend = jax.devices()[0].client
    with pytest.raises(Exception, match=EXTRA_OPTIONS):
        backend.compile_and_load(
            lowered.as_text(), xla_client.DeviceList(tuple(jax.devices()[:1])), options
        )


def test_options_this_xla_does_not_have_are_left_out_of_layer_programs(monkeypatch):
    """An option a newer jaxlib dropped (`xla_cpu_use_fusion_emitters` in 0.11) would fail every
    layer program's compile; `option_known` asks XLA once and the layer options leave it out."""
    from evojax_nas import layerwise

    assert xla_backend.option_known("xla_cpu_enable_fast_math", False)
    assert not xla_backend.option_known("xla_cpu_no_such_option_here", True)
    gone = {"xla_cpu_no_such_option_here": True}
    monkeypatch.setattr(layerwise, "CPU_LAYER_OPTIONS", gone)
    options = layerwise.compiler_options("cpu")
    assert "xla_cpu_no_such_option_here" not in options
    program = jax.jit(lambda x: x * 2, compiler_options=options).lower(jnp.ones(3)).compile()
    np.testing.assert_array_equal(program(jnp.ones(3)), 2 * np.ones(3))
    with pytest.raises(Exception, match="No such compile option"):
        jax.jit(lambda x: x * 2, compiler_options=gone).lower(jnp.ones(3)).compile()
