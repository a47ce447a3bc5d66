"""XLA's FLOPs and compile time of the training programs, compiled for a TPU without one.

    python3 -m venv /tmp/tpuvenv && /tmp/tpuvenv/bin/pip install "jax[tpu]==0.10.2" flax optax
    /tmp/tpuvenv/bin/pip install --no-deps -e .
    /tmp/tpuvenv/bin/python tpu/flops.py [--topology v4:2x2x1] [--nets small_conv bench_conv4]

For each sample net (evojax_nas/samples/*.json) it compiles the programs a worker runs
(`programs.compile_programs`: a chunk of training steps and an evaluation batch, XLA's native
convolution) for one chip of the topology, with CIFAR's shapes (45,000 training images, batch
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
from importlib import resources

N_TRAIN, N_VAL, STEPS = 45_000, 5_000, 25_600


def compile_for_tpu(dna, target, config) -> dict:
    from evojax_nas.programs import Layout, compile_programs, xla_flops

    cifar = Layout(
        (N_TRAIN, 32, 32, 3), "uint8", (125.3, 123.0, 113.9), (63.0, 62.1, 66.7), "cifar"
    )
    programs, (train_c, eval_c) = compile_programs(dna, cifar, config, target)
    ft, fe, eb = xla_flops(train_c), xla_flops(eval_c), config.eval_batch_size
    return {
        "flops_train_step": ft,
        "flops_eval_batch": fe,
        "model_flops_train_step": programs.flops_train_step,  # `architecture.flops`
        "flops_child": STEPS * ft + (N_VAL // eb) * fe,
        "compile_seconds": {k: round(v, 1) for k, v in programs.seconds.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--topology", default="v4:2x2x1", help="e.g. v4:2x2x1, v5e:2x2")
    p.add_argument("--nets", nargs="+", default=["small_conv", "bench_conv4", "bench_conv8"])
    args = p.parse_args()
    import jax

    from evojax_nas import dna as dna_lib
    from evojax_nas.programs import Target
    from evojax_nas.train import TrainConfig

    target = Target.tpu(args.topology)
    print(f"jax {jax.__version__}, compiling for {target.device_kind} ({args.topology})")
    for net in args.nets:
        text = resources.files("evojax_nas.samples").joinpath(f"{net}.json").read_text()
        dna = dataclasses.replace(dna_lib.from_json(text), input_channels=3, num_classes=10)
        out = compile_for_tpu(dna, target, TrainConfig())
        print(json.dumps({"net": net, **out}), flush=True)


if __name__ == "__main__":
    main()
