"""XLA backend options per compiled program, which JAX's `compiler_options` cannot pass.

XLA:CPU reads some of its LLVM settings from `DebugOptions.xla_backend_extra_options`, a map
(e.g. `xla_cpu_disable_loop_unrolling`). `jax.jit(..., compiler_options=...)` sets only
scalar DebugOptions fields ("... is not a valid message value" for a map), so these options
could be set only process-wide, through `XLA_FLAGS`, for every program alike. `install` lets a
program ask for them in its `compiler_options` under `EXTRA_OPTIONS`, a comma-separated list:
it wraps JAX's `jax._src.compiler.get_compile_options` (one function, the one place JAX builds
an `xla_client.CompileOptions`) so that the key is taken out of the overrides and its entries
merged into the compile options' DebugOptions (protobuf merge: a serialized message appended
to another merges into it; field numbers from XLA's `compile_options.proto` and `xla.proto`).
Programs without the key compile exactly as before. The merged options are part of the
compile options, so JAX's persistent cache keys them apart.

If JAX's internals differ from what this expects, `install` returns False and callers leave
the key out (their programs compile with XLA's defaults: slower to compile, never wrong).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

EXTRA_OPTIONS = "evojax_nas_xla_backend_extra_options"

# Field numbers: CompileOptionsProto.executable_build_options = 3,
# ExecutableBuildOptionsProto.debug_options = 3, DebugOptions.xla_backend_extra_options = 500
# (a map<string, string>: entries are messages with key = 1, value = 2).
_BUILD_OPTIONS, _DEBUG_OPTIONS, _EXTRA_MAP = 3, 3, 500

_lock = threading.Lock()
_installed: list[bool] = []  # [result] once `install` has run


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _message_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def extra_options_message(names: Iterable[str]) -> bytes:
    """A serialized CompileOptionsProto that sets only `xla_backend_extra_options[name] = ""`
    for each name (append it to a serialized CompileOptionsProto to merge it in)."""
    entries = b"".join(
        _message_field(_EXTRA_MAP, _message_field(1, name.encode()) + _message_field(2, b""))
        for name in names
    )
    return _message_field(_BUILD_OPTIONS, _message_field(_DEBUG_OPTIONS, entries))


def with_extra_options(compile_options, names: Iterable[str]):
    """A copy of an `xla_client.CompileOptions` with the backend extra options `names` set."""
    merged = compile_options.SerializeAsString() + extra_options_message(names)
    return type(compile_options).ParseFromString(merged)


def _split(value) -> list[str]:
    return [n.strip() for n in str(value).split(",") if n.strip()]


def install() -> bool:
    """Makes `EXTRA_OPTIONS` in a program's `compiler_options` work (idempotent, thread-safe).
    Returns whether it does: False where JAX's internals are not as expected."""
    with _lock:
        if _installed:
            return _installed[0]
        try:
            from jax._src import compiler
            from jax._src.lib import xla_client

            probe = with_extra_options(xla_client.CompileOptions(), ["probe"])
            ok = b"probe" in probe.SerializeAsString() and callable(
                getattr(compiler, "get_compile_options", None)
            )
        except Exception:  # another JAX: go without
            ok = False
        if ok:
            original = compiler.get_compile_options

            def get_compile_options(*args, env_options_overrides=None, **kwargs):
                names: list[str] = []
                if env_options_overrides and EXTRA_OPTIONS in env_options_overrides:
                    env_options_overrides = dict(env_options_overrides)
                    names = _split(env_options_overrides.pop(EXTRA_OPTIONS))
                options = original(*args, env_options_overrides=env_options_overrides, **kwargs)
                return with_extra_options(options, names) if names else options

            get_compile_options.__wrapped__ = original  # type: ignore[attr-defined]
            compiler.get_compile_options = get_compile_options
        _installed.append(ok)
        return ok


_known: dict[tuple[str, object], bool] = {}


def option_known(name: str, value: object) -> bool:
    """Whether this jaxlib's XLA:CPU takes the compile option `name` (a scalar `value`).

    XLA's options come and go between releases, and compiling with one it no longer has fails
    ("No such compile option": jaxlib 0.11 dropped `xla_cpu_use_fusion_emitters`). One tiny
    compile per option and process answers it, handed to the CPU client directly: not one of
    JAX's compiles (no persistent cache, no compile events). Any other failure is raised.
    """
    with _lock:
        if (name, value) in _known:
            return _known[name, value]
    import jax
    import numpy as np
    from jax._src import compiler
    from jax._src.lib import xla_client

    device = jax.devices("cpu")[0]
    text = jax.jit(lambda v: v + 1).lower(np.float32(0)).as_text()
    options = compiler.get_compile_options(
        num_replicas=1, num_partitions=1, env_options_overrides={name: value}
    )
    try:
        device.client.compile_and_load(text, xla_client.DeviceList((device,)), options)
        known = True
    except Exception as exc:
        if "No such compile option" not in str(exc):
            raise
        known = False
    with _lock:
        _known[name, value] = known
    return known


def known_options(options: dict) -> dict:
    """`options` without the XLA:CPU options this jaxlib does not have (`option_known`): those
    compile as XLA's default instead of failing every program. `EXTRA_OPTIONS` is kept."""
    return {k: v for k, v in options.items() if k == EXTRA_OPTIONS or option_known(k, v)}
