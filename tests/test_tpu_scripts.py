"""The Cloud TPU launch scripts: syntax, their dry runs, and their commands in the real gcloud."""

import glob
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "tpu")
SCRIPTS = sorted(glob.glob(os.path.join(TPU, "*.sh")))
SETTINGS = {
    "TPU_NAME": "evo1",
    "ZONE": "us-central2-b",
    "TPU_TYPE": "v4-32",
    "PROJECT": "dummy-project-123",
    "STORE": "gs://my-bucket/runs/evo1",
    "DATA_DIR": "data",
    "DATA_ARCHIVE": "/data/cifar-10-binary.tar.gz",
}
DRY_RUNS = {
    "create": ["create.sh"],
    "create --spot": ["create.sh", "--spot"],
    "create --preemptible": ["create.sh", "--preemptible"],
    "install": ["install.sh"],
    "start": ["start.sh"],
    "watch": ["watch.sh"],
    "stop": ["stop.sh"],
    "delete": ["delete.sh"],
}


def run_script(name, *args, env=None, timeout=30):
    full_env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    full_env.update(env if env is not None else SETTINGS)
    return subprocess.run(
        [shutil.which("bash"), os.path.join(TPU, name), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def dry_run(key):
    out = run_script(*DRY_RUNS[key], "--dry-run")
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines() if line.startswith("gcloud ")]


def test_every_script_is_there():
    names = {os.path.basename(s) for s in SCRIPTS}
    assert {"create.sh", "install.sh", "start.sh", "watch.sh", "stop.sh", "delete.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_parses(script):
    out = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=os.path.dirname(os.sys.executable)
    )
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (.ci/run installs it)")
    scripts = SCRIPTS + sorted(glob.glob(os.path.join(ROOT, "scripts", "*.sh")))
    out = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("name", ["start.sh", "watch.sh"])
def test_scripts_needing_a_store_refuse_without_a_gs_url(name):
    out = run_script(name, "--dry-run", env={**SETTINGS, "STORE": "/tmp/not-gcs"})
    assert out.returncode == 2 and "gs://" in out.stderr


def test_unknown_arguments_are_refused():
    out = run_script("create.sh", "--spto")
    assert out.returncode == 2 and "unknown argument --spto" in out.stderr


def test_spot_and_preemptible_exclude_each_other():
    out = run_script("create.sh", "--spot", "--preemptible", "--dry-run")
    assert out.returncode == 2 and out.stdout == ""


def test_dry_run_of_create():
    (plain,) = dry_run("create")
    assert plain[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and plain[5] == "evo1"
    for flag, value in [
        ("--zone", "us-central2-b"),
        ("--accelerator-type", "v4-32"),
        ("--project", "dummy-project-123"),
        ("--version", "tpu-ubuntu2204-base"),
    ]:
        assert plain[plain.index(flag) + 1] == value
    assert "--spot" not in plain and "--preemptible" not in plain
    assert dry_run("create --spot")[0] == plain[:-2] + ["--spot"] + plain[-2:]
    assert dry_run("create --preemptible")[0] == plain[:-2] + ["--preemptible"] + plain[-2:]


def test_dry_run_of_install_copies_the_checkout_and_the_data_to_every_host():
    commands = dry_run("install")
    assert all(c[4] in ("scp", "ssh") and "--worker=all" in c for c in commands)
    scps = [c for c in commands if c[4] == "scp"]
    assert scps[0][6] == "evo1:~/evojax_nas.tgz"
    assert scps[1][5:7] == ["/data/cifar-10-binary.tar.gz", "evo1:~/evojax_nas/data/"]
    remote = [c[c.index("--command") + 1] for c in commands if c[4] == "ssh"]
    assert "tar -C ~/evojax_nas -xzf ~/evojax_nas.tgz" in remote[0]
    assert "'.[cifar,tpu]'" in remote[-1]  # jax[tpu] pins libtpu to jax's version


def test_dry_run_of_start_runs_one_worker_per_chip_on_every_host_supervised():
    create, workers = dry_run("start")
    assert "--worker=0" in create
    assert (
        ".venv/bin/evojax-nas evolve --out gs://my-bucket/runs/evo1 --config paper "
        "--data-dir data --create-only" in create[create.index("--command") + 1]
    )
    assert "--worker=all" in workers
    remote = workers[workers.index("--command") + 1]
    assert "tpu/supervise.sh .venv/bin/evojax-nas worker gs://my-bucket/runs/evo1" in remote
    assert "--workers auto --restart" in remote and "TPU_VISIBLE_CHIPS" not in remote
    assert "nohup" in remote and "logs/supervise.pid" in remote


def test_dry_run_of_watch_stop_and_delete():
    (hosts,) = dry_run("watch")
    assert "--worker=all" in hosts and "pgrep" in hosts[hosts.index("--command") + 1]
    (stop,) = dry_run("stop")
    assert "kill -TERM $(cat logs/supervise.pid)" in stop[stop.index("--command") + 1]
    (delete,) = dry_run("delete")
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "evo1"]
    assert "--quiet" in delete


def test_without_gcloud_a_real_run_says_so(tmp_path):
    for tool in ("dirname", "basename"):  # a PATH with only what the script needs besides gcloud
        os.symlink(shutil.which(tool), tmp_path / tool)
    env = {**SETTINGS, "PATH": str(tmp_path)}
    out = run_script("delete.sh", env=env)
    assert out.returncode == 2 and "gcloud not found" in out.stderr and "--dry-run" in out.stderr


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="the Google Cloud CLI is not installed")
def test_every_dry_run_command_parses_in_the_real_gcloud():
    """With a dummy project and no credentials, a well-formed command stops at the missing
    account (exit 1); a malformed one would exit 2 with "unrecognized arguments"."""
    commands = sorted({tuple(c) for key in DRY_RUNS for c in dry_run(key)})
    assert len(commands) >= 8
    with tempfile.TemporaryDirectory() as config:  # never ~/.config
        env = {**os.environ, "CLOUDSDK_CONFIG": config, "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}
        env.pop("CLOUDSDK_CORE_ACCOUNT", None)

        def gcloud(command):
            return subprocess.run(
                list(command), capture_output=True, text=True, env=env, timeout=120
            )

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(gcloud, commands))
    for command, out in zip(commands, results, strict=True):
        assert out.returncode == 1, (shlex.join(command), out.stderr)
        assert "You do not currently have an active account selected" in out.stderr, out.stderr


FAKE = """#!/usr/bin/env bash
echo run >> "$1"
if [ "$(wc -l < "$1")" -lt 2 ]; then exit 3; fi   # the first run crashes
sleep 30 > /dev/null 2>&1 &
trap 'kill $!; echo stopped >> "$1"; exit 130' TERM
wait $!
"""


def test_supervise_restarts_a_crashed_command_and_passes_sigterm_on(tmp_path):
    fake, log = tmp_path / "fake.sh", tmp_path / "log"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    proc = subprocess.Popen(
        ["bash", os.path.join(TPU, "supervise.sh"), str(fake), str(log)],
        env={**os.environ, "DELAY": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 20
        while time.time() < deadline and (not log.exists() or log.read_text().count("run") < 2):
            time.sleep(0.1)
        time.sleep(0.5)  # the second run has set its trap
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert log.read_text().split() == ["run", "run", "stopped"]
    assert proc.returncode == 0 and "exit code 3; restarting" in err
