"""XLA's FLOPs and compile time of the training programs, compiled for a TPU without one.

    python3 -m venv /tmp/tpuvenv && /tmp/tpuvenv/bin/pip install "jax[tpu]==0.10.2" flax optax
    /tmp/tpuvenv/bin/pip install --no-deps -e .
    /tmp/tpuvenv/bin/python tpu/flops.py [--topology v4:2x2x1] [--nets small_conv bench_conv4]

For each sample net (evojax_nas/samples/*.json) it compiles the project's own training step and
evaluation step (`train.make_train_step` / `make_eval_step`, XLA's native convolution) for one
chip of the topology, with CIFAR's shapes (45,000 training images resident on the chip, batch
50, evaluation batch 250), and prints XLA's TPU cost analysis and the compile time on this
machine; then the FLOPs of one paper child: 25,600 steps plus one pass over 5,000 validation
images (a sample net made for MNIST gets CIFAR's 3 input channels). libtpu warns about missing
TPU environment variables: harmless for compiling. Where another process holds libtpu's lock
file, set ALLOW_MULTIPLE_LIBTPU_LOAD=1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from importlib import resources

N_TRAIN, N_VAL, STEPS = 45_000, 5_000, 25_600


def compile_for_tpu(dna, device, config) -> dict:
    import jax
    import jax.numpy as jnp

    from evojax_nas.model import DNANet
    from evojax_nas.train import (
        TrainState,
        _abstract_variables,
        _flops,
        make_eval_step,
        make_optimizer,
        make_train_step,
    )

    sharding = jax.sharding.SingleDeviceSharding(device)

    def on_chip(tree):
        return jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree
        )

    meta = {"mean": (125.3, 123.0, 113.9), "std": (63.0, 62.1, 66.7), "augment": "cifar"}
    model = DNANet(dna, conv_impl="xla")
    tx = make_optimizer(config)
    shapes = jax.eval_shape(lambda: _abstract_variables(dna))
    params, stats = shapes["params"], shapes["batch_stats"]
    state = on_chip(
        TrainState(
            params, stats, jax.eval_shape(tx.init, params), jax.ShapeDtypeStruct((), jnp.bool_)
        )
    )
    sds = jax.ShapeDtypeStruct
    args = on_chip(
        (
            sds((N_TRAIN, 32, 32, 3), jnp.uint8),
            sds((N_TRAIN,), jnp.int32),
            sds((N_TRAIN,), jnp.int32),
            sds((), jnp.int32),
            jax.eval_shape(lambda: jax.random.PRNGKey(0)),
            sds((), jnp.float32),
        )
    )
    start = time.perf_counter()
    step = make_train_step(model, tx, meta, config.batch_size, lambda: None)
    train_c = jax.jit(step, donate_argnums=0).lower(state, *args).compile()
    train_s = time.perf_counter() - start
    eb = config.eval_batch_size
    eval_args = on_chip(
        (
            params,
            stats,
            sds((eb, 32, 32, 3), jnp.uint8),
            sds((eb,), jnp.int32),
            sds((eb,), jnp.bool_),
        )
    )
    start = time.perf_counter()
    eval_c = jax.jit(make_eval_step(model, meta)).lower(*eval_args).compile()
    eval_s = time.perf_counter() - start
    ft, fe = _flops(train_c), _flops(eval_c)
    return {
        "flops_train_step": ft,
        "flops_eval_batch": fe,
        "flops_child": STEPS * ft + (N_VAL // eb) * fe,
        "compile_train_s": round(train_s, 1),
        "compile_eval_s": round(eval_s, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--topology", default="v4:2x2x1", help="e.g. v4:2x2x1, v5e:2x2")
    p.add_argument("--nets", nargs="+", default=["small_conv", "bench_conv4", "bench_conv8"])
    args = p.parse_args()
    import jax
    from jax.experimental import topologies

    from evojax_nas import dna as dna_lib
    from evojax_nas.train import TrainConfig

    topo = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
    device = topo.devices[0]
    print(f"jax {jax.__version__}, compiling for {device.device_kind} ({args.topology})")
    for net in args.nets:
        text = resources.files("evojax_nas.samples").joinpath(f"{net}.json").read_text()
        dna = dataclasses.replace(dna_lib.from_json(text), input_channels=3, num_classes=10)
        out = compile_for_tpu(dna, device, TrainConfig())
        print(json.dumps({"net": net, **out}), flush=True)


if __name__ == "__main__":
    main()
