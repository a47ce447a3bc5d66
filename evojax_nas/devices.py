"""Local accelerator chips, counted without opening them, and one worker environment per chip.

`evolve --workers auto` and `worker --workers auto` start one worker process per local chip
(several per GPU), each made to see only its own chip. The chips are counted from the operating
system (device files, the NVIDIA driver), never through JAX: on a TPU host only one process may
own a chip, so a parent that opened the TPU to count it would lock its own children out.

- GPU: ``CUDA_VISIBLE_DEVICES=<i>`` and no preallocation of the GPU's memory
  (``XLA_PYTHON_CLIENT_PREALLOCATE=false``), so that several workers can share a GPU: ``auto``
  starts up to `GPU_WORKERS_PER_CHIP` per GPU (one host core each at least), an explicit
  ``--workers N`` spreads N over the GPUs in turn.
- TPU: ``TPU_VISIBLE_CHIPS=<i>``, ``TPU_CHIPS_PER_PROCESS_BOUNDS=1,1,1``,
  ``TPU_PROCESS_BOUNDS=1,1,1`` and a port of its own (``TPU_PROCESS_PORT``), so that each process
  is a single-chip JAX program of its own.
- CPU: no variables; ``auto`` means the config's number of workers (the behaviour before).
  Two or more local workers on the CPU each get a share of this process's cores
  (``EVOJAX_NAS_CPUS``, `with_cpu_shares`), which they keep to (`apply`): XLA:CPU then sizes
  each worker's thread pool to its share instead of every worker's pool spanning every core.
  ``EVOJAX_NAS_CPU_AFFINITY=off`` leaves the workers unpinned.

`worker_envs` is pure (platform and chips in, environments out) and tested with simulated
device lists; `discover` reads the machine.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from evojax_nas.errors import ConfigError

PLATFORMS = ("cpu", "gpu", "tpu")
# Workers per GPU under `--workers auto` (fewer where the host has fewer cores than that per
# GPU): a worker's GPU idles while it compiles, mutates and publishes on the host, and the
# quick config's nets are far too small to fill one. On one H200 with 16 cores, the quick job
# for 1.5 minutes made 381.9 children/min with 4 workers (layer-wise) against 184.9 with one,
# and 298.2 against 81.2 with whole programs (README, "GPU"). Not measured at the paper's scale.
GPU_WORKERS_PER_CHIP = 4
TPU_PORT_BASE = 8476  # libtpu's default port; worker i gets TPU_PORT_BASE + i
# Set in every worker's environment: what the worker was given (read back into its records).
ASSIGNED = "EVOJAX_NAS_DEVICE"
# A CPU worker's cores (`with_cpu_shares`), e.g. "0" or "0,1"; and the switch that turns it off.
CPUS = "EVOJAX_NAS_CPUS"
CPU_AFFINITY = "EVOJAX_NAS_CPU_AFFINITY"


@dataclasses.dataclass(frozen=True)
class Chips:
    """The accelerator chips of this host.

    Attributes:
        platform: ``"cpu"`` (no accelerator), ``"gpu"`` or ``"tpu"``.
        ids: The chips as the visibility variable names them (``"0"``, ``"1"``, …).
        source: Where they were found (a path or a command), for messages.
    """

    platform: str
    ids: tuple[str, ...] = ()
    source: str = ""


def _split_ids(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def discover(
    environ: Mapping[str, str] | None = None, dev: str = "/dev", proc: str = "/proc"
) -> Chips:
    """Counts this host's accelerator chips without initialising any of them.

    TPU chips are the ``/dev/accel<N>`` files (v2–v4, v5p) or ``/dev/vfio/<N>`` (v5e, v6e);
    GPUs are the entries of ``/proc/driver/nvidia/gpus`` (else the lines of ``nvidia-smi -L``).
    Chips the environment already restricts (``TPU_VISIBLE_CHIPS``, ``CUDA_VISIBLE_DEVICES``)
    are the ones used; ``JAX_PLATFORMS=cpu`` means no accelerator.

    Args:
        environ: The environment to honour (default: this process's).
        dev: The device directory (a test passes a fake one).
        proc: The proc file system (a test passes a fake one).

    Returns:
        The `Chips`; platform ``"cpu"`` with no IDs when there is no accelerator.
    """
    env = os.environ if environ is None else environ
    wanted = {p.strip().lower() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()}
    if wanted and not wanted & {"tpu", "cuda", "gpu", "rocm"}:
        return Chips("cpu", (), "JAX_PLATFORMS")
    if not wanted or "tpu" in wanted:
        accel = sorted(glob.glob(os.path.join(dev, "accel[0-9]*")))
        vfio = sorted(p for p in glob.glob(os.path.join(dev, "vfio", "*")) if p[-1].isdigit())
        found = accel or vfio
        if found:
            ids = tuple(str(i) for i in range(len(found)))
            if env.get("TPU_VISIBLE_CHIPS"):
                ids = _split_ids(env["TPU_VISIBLE_CHIPS"])
            return Chips("tpu", ids, os.path.dirname(found[0]))
    if not wanted or wanted & {"cuda", "gpu"}:
        count, source = _count_nvidia(proc)
        if count:
            ids = tuple(str(i) for i in range(count))
            if "CUDA_VISIBLE_DEVICES" in env:
                ids = tuple(i for i in _split_ids(env["CUDA_VISIBLE_DEVICES"]) if i != "-1")
            if ids:
                return Chips("gpu", ids, source)
    return Chips("cpu", (), "")


def cpu_only_environment(
    environ: Mapping[str, str] | None = None,
    dev: str = "/dev",
    proc: str = "/proc",
    installed: Callable[[str], bool] | None = None,
) -> dict[str, str]:
    """``{"JAX_PLATFORMS": "cpu"}`` where JAX would try a TPU this host does not have, else {}.

    With libtpu installed (the `tpu` extra, to compile for TPU here) JAX initialises the TPU
    runtime in every process, which on a host without TPU chips prints libtpu's warnings
    ("could not determine TPU accelerator type", "unexpected worker hostname") and then falls
    back to the CPU. Naming the CPU platform skips that. Compiling for a TPU without one
    (`programs.Target.tpu`) still works: it describes a topology, not a backend. Nothing is
    set where the user chose `JAX_PLATFORMS`, where there are chips (`discover`), or where a
    GPU plugin for JAX is installed (the count of GPUs may have missed one).

    Args:
        environ: The environment (default: this process's).
        dev, proc: As for `discover`.
        installed: Whether a top-level module is installed (default: `importlib.util.find_spec`).
    """
    env = os.environ if environ is None else environ
    if installed is None:
        import importlib.util

        installed = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731
    if env.get("JAX_PLATFORMS") or not installed("libtpu"):
        return {}
    if discover(env, dev, proc).platform != "cpu" or installed("jax_plugins"):
        return {}
    return {"JAX_PLATFORMS": "cpu"}


def apply_cpu_only_environment() -> dict[str, str]:
    """Sets `cpu_only_environment()` in this process's environment, if JAX is not imported yet
    (JAX reads JAX_PLATFORMS when imported; processes started from here inherit it): the
    command line and the benchmark scripts call it first. Returns what it set."""
    if "jax" in sys.modules:
        return {}
    env = cpu_only_environment()
    os.environ.update(env)
    return env


def _count_nvidia(proc: str) -> tuple[int, str]:
    gpus = os.path.join(proc, "driver", "nvidia", "gpus")
    if os.path.isdir(gpus) and os.listdir(gpus):
        return len(os.listdir(gpus)), gpus
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0, ""
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0, ""
    return len(re.findall(r"^GPU \d+", out, flags=re.MULTILINE)), "nvidia-smi -L"


def worker_envs(
    platform: str, chips: Sequence[str], cpu_workers: int, gpu_workers: int | None = None
) -> list[dict[str, str]]:
    """The environment variables of each local worker process, one worker per chip (GPUs: any
    number, spread over the chips in turn).

    Args:
        platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``.
        chips: The chip IDs (see `Chips.ids`); ignored on CPU.
        cpu_workers: How many workers to run when there is no accelerator.
        gpu_workers: How many workers share the GPUs (default: one per GPU).

    Returns:
        One dict per worker, to be set before the worker imports JAX; on CPU ``cpu_workers``
        dicts naming only the assignment.

    Raises:
        ValueError: An unknown platform, or an accelerator platform with no chips.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; expected one of {PLATFORMS}")
    if platform == "cpu":
        return [{ASSIGNED: "cpu"} for _ in range(cpu_workers)]
    if not chips:
        raise ValueError(f"platform {platform} with no chips")
    if platform == "gpu":
        n = len(chips) if gpu_workers is None else gpu_workers
        if n < 1:
            raise ValueError(f"{n} GPU workers")
        return [
            {
                "CUDA_VISIBLE_DEVICES": chip,
                "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                ASSIGNED: f"gpu:{chip}",
            }
            for chip in (chips[i % len(chips)] for i in range(n))
        ]
    return [
        {
            "TPU_VISIBLE_CHIPS": chip,
            "TPU_CHIPS_PER_PROCESS_BOUNDS": "1,1,1",
            "TPU_PROCESS_BOUNDS": "1,1,1",
            "TPU_PROCESS_PORT": str(TPU_PORT_BASE + i),
            "TPU_PROCESS_ADDRESSES": f"localhost:{TPU_PORT_BASE + i}",
            ASSIGNED: f"tpu:{chip}",
        }
        for i, chip in enumerate(chips)
    ]


def gpu_workers_per_chip(chips: int, cores: int) -> int:
    """Workers per GPU under ``auto``: `GPU_WORKERS_PER_CHIP`, at most one per host core."""
    return max(1, min(GPU_WORKERS_PER_CHIP, cores // max(chips, 1)))


def host_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def plan(
    cpu_workers: int, chips: Chips | None = None, cores: int | None = None
) -> list[dict[str, str]]:
    """`worker_envs` of ``--workers auto`` for this host (or for `chips` and `cores`, e.g.
    simulated ones): one worker per TPU chip, `gpu_workers_per_chip` per GPU, `cpu_workers`
    on a CPU."""
    chips = discover() if chips is None else chips
    per_gpu = gpu_workers_per_chip(len(chips.ids), host_cores() if cores is None else cores)
    return worker_envs(chips.platform, chips.ids, cpu_workers, per_gpu * len(chips.ids))


def explicit_plan(workers: int, chips: Chips | None = None) -> list[dict[str, str]] | None:
    """The environments of ``--workers N``: on a GPU host N workers spread over the GPUs (each
    seeing one, none preallocating its memory: without that a second process on a GPU finds
    three quarters of it taken); on a TPU host one chip each, N at most the chips (a chip has
    one owner: a second process on it fails); on a CPU None (the workers share the cores,
    `with_cpu_shares`).

    Raises:
        ConfigError: More workers than a TPU host has chips.
    """
    chips = discover() if chips is None else chips
    if chips.platform == "gpu":
        return worker_envs("gpu", chips.ids, workers, gpu_workers=workers)
    if chips.platform == "tpu":
        if workers > len(chips.ids):
            raise ConfigError(
                f"--workers {workers}: this host has {len(chips.ids)} TPU chip(s), and a chip "
                "takes one worker process (--workers auto: one per chip)"
            )
        return worker_envs("tpu", chips.ids[:workers], workers)
    return None


def describe_plan(envs: Sequence[Mapping[str, str]]) -> str:
    """One line naming what each worker gets, e.g. ``4 workers: tpu:0, tpu:1, tpu:2, tpu:3``."""
    names = [e.get(ASSIGNED, "cpu") for e in envs]
    if set(names) == {"cpu"}:
        return f"{len(names)} worker{'s' * (len(names) != 1)} on the CPU (no accelerator found)"
    per = "one per chip" if len(set(names)) == len(names) else f"on {len(set(names))} chip(s)"
    return f"{len(names)} workers, {per}: {', '.join(names)}"


def cpu_shares(workers: int, cpus: Sequence[int]) -> list[tuple[int, ...]]:
    """`cpus` split into `workers` shares as equal as can be, each of consecutive cores (more
    workers than cores: one core each, in turn)."""
    if workers < 1 or not cpus:
        raise ValueError(f"cannot share {len(cpus)} cores among {workers} workers")
    cpus = sorted(cpus)
    if workers >= len(cpus):
        return [(cpus[i % len(cpus)],) for i in range(workers)]
    base, extra = divmod(len(cpus), workers)
    shares, start = [], 0
    for i in range(workers):
        size = base + (i < extra)
        shares.append(tuple(cpus[start : start + size]))
        start += size
    return shares


def with_cpu_shares(
    envs: Sequence[Mapping[str, str]],
    platform: str,
    cpus: Sequence[int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[dict[str, str]]:
    """`envs` with each CPU worker's share of the cores (``EVOJAX_NAS_CPUS``), where two or
    more workers train on the CPU of one host.

    Unpinned, each worker's XLA:CPU thread pool spans every core, so two workers on two cores
    run four busy threads and preempt each other mid-kernel. Pinned, each keeps to its share:
    on this project's 2-core machine two workers produced 1.19x the children per minute
    (`scripts/bench_child.py --concurrent 2`; README, "Layer-wise training"). Left as they
    are: a single worker, workers on accelerator chips, ``EVOJAX_NAS_CPU_AFFINITY=off`` in
    `environ`, and a platform without affinity.

    Args:
        envs: One environment per worker (`plan`, or empty dicts).
        platform: What the workers train on (`discover().platform`): only ``"cpu"`` is shared.
        cpus: The cores to share (default: those this process may run on).
        environ: Where ``EVOJAX_NAS_CPU_AFFINITY`` is read (default: this process's).
    """
    environ = os.environ if environ is None else environ
    on_cpu = platform == "cpu" and all(env.get(ASSIGNED, "cpu") == "cpu" for env in envs)
    if len(envs) < 2 or not on_cpu or environ.get(CPU_AFFINITY, "").lower() == "off":
        return [dict(env) for env in envs]
    if cpus is None:
        if not hasattr(os, "sched_getaffinity"):  # macOS, Windows
            return [dict(env) for env in envs]
        cpus = sorted(os.sched_getaffinity(0))
    shares = cpu_shares(len(envs), cpus)
    return [
        {**env, CPUS: ",".join(map(str, share))} for env, share in zip(envs, shares, strict=True)
    ]


def apply(env: Mapping[str, str]) -> None:
    """Sets a worker's variables in this process, and keeps it to its cores
    (``EVOJAX_NAS_CPUS``, given in `env` or inherited: the ``worker`` processes that
    ``worker --workers N`` starts); call it before JAX opens a device."""
    os.environ.update(env)
    cores = os.environ.get(CPUS)
    if cores and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
        except (OSError, ValueError) as exc:  # a core gone since (CPU hotplug, a cgroup change)
            logging.getLogger(__name__).warning("could not keep to cores %s: %s", cores, exc)


def device_info() -> dict:
    """The platform and device kind this process trains on (opens the backend), for records."""
    import jax

    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "kind": device.device_kind,
        "assigned": os.environ.get(ASSIGNED, ""),
        "cpus": os.environ.get(CPUS, ""),  # its share of the host's cores; "": all of them
    }


def workers_arg(text: str) -> int | str:
    """argparse type of ``--workers``: a positive integer or ``auto``."""
    import argparse

    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}")
    return value


# Exit codes a worker ends with on purpose: done, a user error, interrupted.
_DELIBERATE = (0, 2, 130, -signal.SIGINT, -signal.SIGTERM)


def run_worker_processes(
    store: str,
    envs: Sequence[Mapping[str, str]],
    extra_args: Sequence[str] = (),
    *,
    restart: bool = False,
    verbose: bool = False,
    restart_delay: float = 10.0,
    out=None,
    command: Sequence[str] | None = None,
) -> int:
    """Runs one ``evojax-nas worker STORE`` process per environment and waits for them all.

    Each process starts with its environment already set (its own chip, before Python starts).
    An interrupt (Ctrl-C, ``kill -INT`` or ``kill -TERM`` of this process) is passed on to them.

    Args:
        store: The run's store.
        envs: One environment per worker (see `plan`).
        extra_args: More arguments for each ``worker`` command (``--max-children`` …).
        restart: Restart a worker that dies (a crash or a kill, not a finish or a user error).
        verbose: Run the workers with ``-v``.
        restart_delay: Seconds to wait before restarting one.
        out: Where to print restarts (default stdout).
        command: The command to run instead of ``evojax-nas worker`` (tests).

    Returns:
        0 if every worker finished cleanly, else the first non-zero exit code (2 stays 2).
    """
    out = sys.stdout if out is None else out
    if command is None:
        command = [sys.executable, "-m", "evojax_nas.cli", *["-v"] * verbose, "worker", store]
        command += ["--workers", "1", *extra_args]

    def start(env: Mapping[str, str]) -> subprocess.Popen:
        return subprocess.Popen(command, env={**os.environ, **env})

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # started in the background by a shell
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the workers inherit it
    procs = [start(env) for env in envs]
    codes: list[int | None] = [None] * len(procs)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while any(c is None for c in codes):
            for i, p in enumerate(procs):
                if codes[i] is not None or p.poll() is None:
                    continue
                if restart and p.returncode not in _DELIBERATE:
                    print(
                        f"worker process on {envs[i].get(ASSIGNED, 'cpu')} died "
                        f"(exit {p.returncode}); restarting it in {restart_delay:g} s",
                        file=out,
                        flush=True,
                    )
                    time.sleep(restart_delay)
                    procs[i] = start(envs[i])
                else:
                    codes[i] = p.returncode
            time.sleep(0.5)
    except KeyboardInterrupt:
        _interrupt_all(procs)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = [c for c in codes if c]
    return (2 if 2 in failed else failed[0] if failed[0] > 0 else 1) if failed else 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _interrupt_all(procs: Sequence[subprocess.Popen], grace: float = 15.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    end = time.time() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
