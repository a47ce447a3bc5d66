"""`evojax-nas train`: train one individual from a DNA file and print its fitness and costs."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

from evojax_nas.cli_common import positive_int
from evojax_nas.config import TRAIN_IMPLS
from evojax_nas.data import DATASETS
from evojax_nas.errors import ConfigError, DNAError

if TYPE_CHECKING:  # JAX is imported only when a command runs: `--help` stays fast
    from evojax_nas import dna as dna_lib

# The shipped sample DNAs: the same names as `evojax_nas.samples.SAMPLES` (checked by a test;
# that package imports JAX).
SAMPLES = ("small_conv", "bench_conv4", "bench_conv8")
DATASET_HELP = f"one of {', '.join(DATASETS)}, or npz:PATH (your own .npz file)"


def read_dna(spec: str) -> dna_lib.DNA:
    """`samples.read_dna` for a command line: a file that is not text is a DNAError too."""
    from evojax_nas import samples

    try:
        return samples.read_dna(spec)
    except UnicodeDecodeError:
        raise DNAError(f"{spec} is not a DNA JSON file: it is not text (UTF-8)") from None


def add_command(sub) -> None:
    p = sub.add_parser("train", help="train one individual from a DNA and print its fitness")
    p.add_argument(
        "--dna",
        required=True,
        help="DNA JSON file, 'initial' (the paper's start) or a sample: " + ", ".join(SAMPLES),
    )
    p.add_argument("--steps", type=positive_int, default=1000, help="training steps (1000)")
    p.add_argument("--batch-size", type=positive_int, default=50, help="batch size (50)")
    p.add_argument("--dataset", default="mnist5k", help=DATASET_HELP + " (default mnist5k)")
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data_dir (CIFAR)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="run seed (0): weights and training keys are those of the initial individual that "
        "worker 0's first event of a run with this seed makes",
    )
    p.add_argument("--learning-rate", type=float, default=None, help="override the DNA's")
    p.add_argument(
        "--train-impl",
        choices=TRAIN_IMPLS,
        default="auto",
        help="whole: one compiled program; layerwise: per-layer programs; auto (default): as "
        "a run with these --steps trains its children (layerwise on a CPU up to 1000 steps, on a "
        "GPU up to 500)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from evojax_nas import dna as dna_lib
    from evojax_nas.data import load_dataset
    from evojax_nas.evolution import resolve_train_impl
    from evojax_nas.keys import TRAIN, event_key, for_purpose
    from evojax_nas.recipe import initial_variables
    from evojax_nas.train import TrainConfig, train_and_evaluate

    start = time.perf_counter()
    dataset = load_dataset(args.dataset, data_dir=args.data_dir)
    dna = read_dna(args.dna)
    dna = dna_lib.for_data(dna, dataset.image_shape[-1], dataset.num_classes)
    if args.learning_rate is not None:
        if not args.learning_rate > 0:
            raise ConfigError(f"--learning-rate must be > 0, got {args.learning_rate}")
        dna = dna_lib.validate(dna.replace(learning_rate=args.learning_rate))
    t_data = time.perf_counter()
    # The keys of worker 0's event 0 of a run with this seed, which always makes an initial
    # individual: `train --dna initial` starts from its weights and trains with its key.
    key = event_key(args.seed, 0, 0)
    variables = initial_variables(key, dna)
    t_init = time.perf_counter()
    impl = resolve_train_impl(args.train_impl, args.steps)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, train_impl=impl)
    result = train_and_evaluate(dna, variables, dataset, for_purpose(key, TRAIN), config)
    timings = {"data": t_data - start, "init": t_init - t_data, **result.timings}
    summary = {
        "architecture": dna_lib.describe(dna),
        "architecture_key": dna_lib.architecture_key(dna),
        "dataset": dataset.name,
        "learning_rate": dna.learning_rate,
        "steps": result.steps_run,
        "val_accuracy": result.val_accuracy,
        "diverged": result.diverged,
        "params": result.param_count,
        "flops_train_step": result.flops_train_step,
        "flops_eval_batch": result.flops_eval_batch,
        "flops": result.flops,
        "seconds": timings,
        "seconds_per_step": result.timings["train"] / max(result.steps_run, 1),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"architecture    {summary['architecture']}")
    print(
        f"dataset         {dataset.name} ({dataset.x_train.shape[0]} train, "
        f"{dataset.x_val.shape[0]} validation)"
    )
    status = "  DIVERGED (non-finite loss): fitness 0" if result.diverged else ""
    print(f"val accuracy    {result.val_accuracy:.4f} after {result.steps_run} steps{status}")
    print(f"parameters      {result.param_count:,}")
    print(
        f"FLOPs           {result.flops:.3e} (train step {result.flops_train_step:.3e}, "
        f"eval batch {result.flops_eval_batch:.3e})"
    )
    print(
        "wall time       "
        + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
        + f"  ({summary['seconds_per_step'] * 1e3:.1f} ms/step)"
    )
    return 0
