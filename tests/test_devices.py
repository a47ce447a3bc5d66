"""One worker per accelerator chip: discovery from the OS, each worker's environment, records."""

import json
import os
import subprocess
import sys

import pytest

from evojax_nas import devices
from evojax_nas.config import EvolutionConfig
from evojax_nas.devices import ASSIGNED, Chips, discover, worker_envs


def test_gpu_workers_each_see_one_gpu_and_do_not_preallocate():
    envs = worker_envs("gpu", ["0", "1", "2"], cpu_workers=5)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "2"]
    assert all(e["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" for e in envs)
    assert [e[ASSIGNED] for e in envs] == ["gpu:0", "gpu:1", "gpu:2"]


def test_several_workers_share_a_gpu_spread_over_the_gpus_in_turn():
    """auto: up to GPU_WORKERS_PER_CHIP per GPU, no more than the host's cores; an explicit
    count: that many, on GPUs only (elsewhere every worker sees every device, as before)."""
    two = Chips("gpu", ("0", "1"))
    envs = devices.plan(1, two, cores=16)
    assert [e[ASSIGNED] for e in envs] == ["gpu:0", "gpu:1"] * devices.GPU_WORKERS_PER_CHIP
    assert all(e["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" for e in envs)
    assert len(devices.plan(1, two, cores=4)) == 4  # two cores per GPU: two workers each
    assert len(devices.plan(1, two, cores=1)) == 2  # never fewer than one per GPU
    assert len(devices.plan(1, Chips("tpu", ("0", "1")), cores=16)) == 2  # TPU: one per chip
    assert devices.plan(3, Chips("cpu"), cores=16) == [{ASSIGNED: "cpu"}] * 3
    assert "8 workers, on 2 chip(s): gpu:0, gpu:1" in devices.describe_plan(envs)
    three = devices.explicit_plan(3, two)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in three] == ["0", "1", "0"]
    assert all(e["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" for e in three)
    assert devices.explicit_plan(3, Chips("cpu")) is None


def test_an_explicit_count_on_a_tpu_host_gives_each_worker_a_chip_of_its_own():
    from evojax_nas.errors import ConfigError

    four = Chips("tpu", ("0", "1", "2", "3"))
    assert [e["TPU_VISIBLE_CHIPS"] for e in devices.explicit_plan(2, four)] == ["0", "1"]
    with pytest.raises(ConfigError, match="4 TPU chip"):
        devices.explicit_plan(5, four)


def test_tpu_workers_are_single_chip_processes_with_their_own_port():
    envs = worker_envs("tpu", ["0", "1", "2", "3"], cpu_workers=1)
    assert [e["TPU_VISIBLE_CHIPS"] for e in envs] == ["0", "1", "2", "3"]
    assert all(e["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,1,1" for e in envs)
    assert all(e["TPU_PROCESS_BOUNDS"] == "1,1,1" for e in envs)
    ports = [e["TPU_PROCESS_PORT"] for e in envs]
    assert len(set(ports)) == 4 and ports[0] == "8476"
    assert [e["TPU_PROCESS_ADDRESSES"] for e in envs][1] == "localhost:8477"


def test_cpu_keeps_the_configured_number_of_workers():
    assert worker_envs("cpu", [], cpu_workers=3) == [{ASSIGNED: "cpu"}] * 3
    assert "3 workers on the CPU" in devices.describe_plan(worker_envs("cpu", [], 3))
    with pytest.raises(ValueError):
        worker_envs("gpu", [], 1)
    with pytest.raises(ValueError):
        worker_envs("ipu", ["0"], 1)


NV = "proc/driver/nvidia/gpus/"


def fake_root(tmp_path, *paths):
    for p in paths:
        full = tmp_path / p
        full.parent.mkdir(parents=True, exist_ok=True)
        (full.mkdir if p.endswith("/") else full.touch)()
    return str(tmp_path / "dev"), str(tmp_path / "proc")


@pytest.mark.parametrize(
    ("paths", "environ", "expected"),
    [
        ([], {}, Chips("cpu")),
        (["dev/accel0", "dev/accel1", "dev/accel2", "dev/accel3"], {}, ("tpu", 4)),  # v4 host
        ([f"dev/vfio/{i}" for i in range(8)] + ["dev/vfio/vfio"], {}, ("tpu", 8)),  # v5e / v6e
        (["dev/accel0", "dev/accel1"], {"TPU_VISIBLE_CHIPS": "1"}, ("tpu", ("1",))),
        (["dev/accel0"], {"JAX_PLATFORMS": "cpu"}, Chips("cpu", (), "JAX_PLATFORMS")),
        ([NV + "0000:01:00.0/", NV + "0000:02:00.0/"], {}, ("gpu", 2)),
        ([NV + "0000:01:00.0/"], {"CUDA_VISIBLE_DEVICES": "3,5"}, ("gpu", ("3", "5"))),
        ([NV + "0000:01:00.0/"], {"CUDA_VISIBLE_DEVICES": ""}, Chips("cpu")),
    ],
)  # fmt: skip
def test_chips_are_counted_from_device_files_without_opening_them(
    tmp_path, monkeypatch, paths, environ, expected
):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no nvidia-smi
    dev, proc = fake_root(tmp_path, *paths)
    chips = discover(environ, dev=dev, proc=proc)
    if isinstance(expected, Chips):
        assert chips == expected
        return
    platform, ids = expected
    ids = tuple(str(i) for i in range(ids)) if isinstance(ids, int) else ids
    assert (chips.platform, chips.ids) == (platform, ids)


@pytest.mark.parametrize(
    ("paths", "environ", "modules", "expected"),
    [
        ([], {}, {"libtpu"}, {"JAX_PLATFORMS": "cpu"}),  # the tpu extra on a CPU-only host
        ([], {}, set(), {}),  # no libtpu: JAX tries no TPU
        ([], {"JAX_PLATFORMS": "tpu"}, {"libtpu"}, {}),  # the user's choice stands
        (["dev/accel0"], {}, {"libtpu"}, {}),  # a TPU host
        ([NV + "0000:01:00.0/"], {}, {"libtpu"}, {}),  # a GPU host
        ([], {}, {"libtpu", "jax_plugins"}, {}),  # a GPU plugin: there may be a GPU
    ],
)  # fmt: skip
def test_cpu_only_environment_where_jax_would_try_a_missing_tpu(
    tmp_path, monkeypatch, paths, environ, modules, expected
):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no nvidia-smi
    dev, proc = fake_root(tmp_path, *paths)
    got = devices.cpu_only_environment(environ, dev, proc, installed=modules.__contains__)
    assert got == expected


def test_gpus_are_counted_by_nvidia_smi_when_proc_has_none(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-a)'\n"
        "echo 'GPU 1: NVIDIA H200 (UUID: GPU-b)'\n"
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    chips = discover({}, dev=str(tmp_path / "dev"), proc=str(tmp_path / "proc"))
    assert (chips.platform, chips.ids, chips.source) == ("gpu", ("0", "1"), "nvidia-smi -L")


def test_planning_the_workers_opens_no_device_in_the_parent():
    """On a TPU host only one process may own a chip: the parent must leave them to its workers."""
    code = (
        "import evojax_nas.cli, evojax_nas.runner, evojax_nas.evolution, evojax_nas.train\n"
        "from evojax_nas.devices import plan, describe_plan\n"
        "evojax_nas.train.enable_compilation_cache()\n"
        "print(describe_plan(plan(2)))\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge._backends, xla_bridge._backends\n"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "2 workers on the CPU" in out.stdout


def test_each_spawned_worker_gets_its_own_chip_and_records_it(tmp_path):
    """Simulated two-GPU host on the CPU: each worker process receives one GPU's variables and
    names it in its records; `status` counts workers per device."""
    from evojax_nas.runner import evolve, run_status
    from evojax_nas.store import open_store

    cfg = EvolutionConfig(
        dataset="digits8x8", population=2, workers=2, steps=2, max_children=4, max_minutes=None
    )
    envs = worker_envs("gpu", ["0", "1"], cpu_workers=cfg.workers)
    evolve(str(tmp_path / "run"), cfg, worker_envs=envs, out=open(os.devnull, "w"))
    records = open_store(str(tmp_path / "run")).records()
    assigned = {r["worker"]: r["device"]["assigned"] for r in records}
    assert sorted(assigned.values()) == ["gpu:0", "gpu:1"]  # one chip each, none shared
    assert all(r["device"]["platform"] == "cpu" and r["device"]["kind"] for r in records)
    status = run_status(open_store(str(tmp_path / "run")))
    assert status["workers_per_device"] == {f"cpu {records[0]['device']['kind']}": 2}


CHILD = """
import json, os, sys
out, marker = sys.argv[1], sys.argv[2]
with open(out, "a") as f:
    keys = ("CUDA_VISIBLE_DEVICES", "EVOJAX_NAS_DEVICE")
    f.write(json.dumps({k: os.environ.get(k) for k in keys}) + "\\n")
if os.environ["CUDA_VISIBLE_DEVICES"] == "1" and not os.path.exists(marker):
    open(marker, "w").close()
    os.abort()  # a crash: restarted once
sys.exit(2 if os.environ["CUDA_VISIBLE_DEVICES"] == "2" else 0)  # 2: a user error, not restarted
"""


def test_the_launcher_gives_each_process_its_env_and_restarts_a_crashed_one(tmp_path):
    log, marker = tmp_path / "env.jsonl", tmp_path / "crashed"
    envs = worker_envs("gpu", ["0", "1", "2"], cpu_workers=1)
    code = devices.run_worker_processes(
        "unused",
        envs,
        restart=True,
        restart_delay=0.0,
        out=open(os.devnull, "w"),
        command=[sys.executable, "-c", CHILD, str(log), str(marker)],
    )
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(s["CUDA_VISIBLE_DEVICES"] for s in seen) == ["0", "1", "1", "2"]
    assert all(s["EVOJAX_NAS_DEVICE"] == "gpu:" + s["CUDA_VISIBLE_DEVICES"] for s in seen)
    assert code == 2  # the user error is reported, not hidden by the others' success


def test_cpu_workers_share_the_cores_as_equally_as_can_be():
    assert devices.cpu_shares(2, [1, 0]) == [(0,), (1,)]
    assert devices.cpu_shares(3, range(8)) == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert devices.cpu_shares(1, [4, 5]) == [(4, 5)]
    assert devices.cpu_shares(3, [0, 1]) == [(0,), (1,), (0,)]  # more workers than cores
    with pytest.raises(ValueError):
        devices.cpu_shares(2, [])


def test_only_several_cpu_workers_are_pinned_and_the_user_can_turn_it_off():
    cpu = worker_envs("cpu", [], 2)
    pinned = devices.with_cpu_shares(cpu, "cpu", cpus=[0, 1], environ={})
    assert [e[devices.CPUS] for e in pinned] == ["0", "1"]
    assert all(e[ASSIGNED] == "cpu" for e in pinned)  # what was there stays
    assert devices.with_cpu_shares([{}, {}], "cpu", cpus=[0, 1, 2, 3], environ={}) == [
        {devices.CPUS: "0,1"},
        {devices.CPUS: "2,3"},
    ]
    off = {devices.CPU_AFFINITY: "off"}
    assert devices.with_cpu_shares(cpu, "cpu", cpus=[0, 1], environ=off) == cpu
    assert devices.with_cpu_shares(cpu[:1], "cpu", cpus=[0, 1], environ={}) == cpu[:1]
    gpus = worker_envs("gpu", ["0", "1"], 2)
    assert devices.with_cpu_shares(gpus, "gpu", cpus=[0, 1], environ={}) == gpus
    # an explicit --workers count on a GPU host: every worker sees the GPUs, no pinning
    assert devices.with_cpu_shares([{}, {}], "gpu", cpus=[0, 1], environ={}) == [{}, {}]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_a_worker_keeps_to_its_share_of_the_cores():
    """Given in its env (`evolve`'s workers) or inherited (the processes of `worker
    --workers N`, which apply an env without it)."""
    first = min(os.sched_getaffinity(0))
    code = (
        "import os, sys; from evojax_nas.devices import apply, device_info; "
        "apply({'EVOJAX_NAS_CPUS': sys.argv[1]} if sys.argv[1] else {}); "
        "print(sorted(os.sched_getaffinity(0)), device_info()['cpus'])"
    )
    env = {k: v for k, v in os.environ.items() if k != devices.CPUS}
    for given, inherited in ((str(first), {}), ("", {devices.CPUS: str(first)})):
        out = subprocess.run(
            [sys.executable, "-c", code, given],
            capture_output=True,
            text=True,
            env={**env, **inherited},
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [f"[{first}]", str(first)]
