"""The Cloud TPU launch scripts: syntax, and the checks they make before calling gcloud."""

import glob
import os
import subprocess

import pytest

TPU = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tpu")
SCRIPTS = sorted(glob.glob(os.path.join(TPU, "*.sh")))


def test_every_script_is_there():
    names = {os.path.basename(s) for s in SCRIPTS}
    assert {"create.sh", "install.sh", "start.sh", "watch.sh", "stop.sh", "delete.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_parses(script):
    out = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", ["start.sh", "watch.sh"])
def test_scripts_needing_a_store_refuse_without_a_gs_url(name):
    env = {k: v for k, v in os.environ.items() if k != "STORE"}
    env["STORE"] = "/tmp/not-gcs"
    out = subprocess.run(
        ["bash", os.path.join(TPU, name)], capture_output=True, text=True, env=env, timeout=30
    )
    assert out.returncode == 2 and "gs://" in out.stderr
