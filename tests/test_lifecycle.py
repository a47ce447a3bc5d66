"""`evolve` owns its workers: through the real entry point, with real signals and pipes.

Each test runs a tiny run (digits8x8, population 3, 5 steps per child) and kills whatever it
started, by PID, in a `finally`.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from evojax_nas import devices
from evojax_nas.store import open_store

EXE = os.path.join(os.path.dirname(sys.executable), "evojax-nas")
TINY = ["--population", "3", "--workers", "2", "--steps", "5", "--dataset", "digits8x8"]


def _children(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        kids = [p for p, pp in parents.items() if pp == cur]
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_until(cond, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.3)
    return cond()


def _records(run) -> int:
    try:
        return len(open_store(str(run), create=False).records())
    except Exception:
        return 0


@pytest.fixture
def launch(tmp_path):
    """Starts `evojax-nas ARGS…`; kills it and every process it started at the end."""
    started = []

    def start(*args, ignore_sigint=False, **kw):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop(devices.CPU_AFFINITY, None)  # the default: workers pinned

        def pre():
            if ignore_sigint:  # what `nohup … &` in a script gives the job
                signal.signal(signal.SIGINT, signal.SIG_IGN)

        proc = subprocess.Popen(
            [EXE, *args], env=env, cwd=tmp_path, preexec_fn=pre, text=True, **kw
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        for pid in [*_children(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)


def test_kill_int_of_a_background_evolve_stops_everything_and_keeps_the_set_point(launch, tmp_path):
    run = tmp_path / "run"
    proc = launch(
        "evolve", "--out", str(run), *TINY, "--max-children", "500",
        ignore_sigint=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert _wait_until(lambda: _records(run) >= 5, 240), proc.stderr.read() if proc.poll() else ""
    workers = _children(proc.pid)
    assert workers
    proc.send_signal(signal.SIGINT)  # `kill -INT PID`, to the parent only
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "stopped" in stdout and "worker" in stdout and "Traceback" not in stderr
    assert _wait_until(lambda: not [p for p in workers if _alive(p)], 5)
    store = open_store(str(run), create=False)
    assert len(store.population()) == 3  # the interrupted child did not leave a hole
    settled = len(store.records())
    time.sleep(2)  # no orphan goes on publishing
    assert len(store.records()) == settled


@pytest.mark.parametrize(
    "sig, records, grace",
    [
        (signal.SIGTERM, 2, 5),  # evolve stops its workers itself
        (signal.SIGKILL, 1, 20),  # evolve cannot stop anyone: the workers notice and stop
    ],
    ids=["sigterm", "sigkill"],
)
def test_evolve_ended_by_a_signal_leaves_no_process_behind(launch, tmp_path, sig, records, grace):
    run = tmp_path / "run"
    with open(tmp_path / "stderr", "w+") as stderr:  # a file: workers may outlive the parent
        proc = launch(
            "evolve", "--out", str(run), *TINY, "--max-children", "500",
            stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
        assert _wait_until(lambda: _records(run) >= records, 240)
        tree = _children(proc.pid)
        assert tree
        proc.send_signal(sig)
        proc.wait(timeout=60)
        stderr.seek(0)
        message = stderr.read()
    if sig == signal.SIGKILL:
        assert proc.returncode == -sig
    else:
        assert proc.returncode == 128 + sig and "Traceback" not in message, message
    assert _wait_until(lambda: not [p for p in tree if _alive(p)], grace)


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    run = tmp_path / "run"
    cmd = f"{EXE} evolve --out {run} {' '.join(TINY)} --max-children 500 | head -1"
    out = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=240
    )
    assert out.stdout.startswith("run ") and len(out.stdout.splitlines()) == 1
    assert out.returncode == 141, out.stderr  # like any command whose reader left
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


def test_a_worker_that_dies_is_restarted(launch, tmp_path):
    run = tmp_path / "run"
    proc = launch(
        "evolve", "--out", str(run), *TINY, "--max-children", "14",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    # Early, so that the victim still has children of its share to train (one that died
    # after its share is not restarted: test_a_worker_that_died_after_its_share_is_not_redone).
    assert _wait_until(lambda: _records(run) >= 1, 240)
    victim = _children(proc.pid)
    victim = [p for p in victim if b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()][0]
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    assert "died (signal 9); restarted as worker" in stdout
    assert "done: 14 children" in stdout
    # evolve marked the dead worker stopped: its child in flight can be resumed at once
    dead = int(re.search(r"worker (\d+) died \(signal 9\)", stdout).group(1))
    beats = {w["worker"]: w for w in open_store(str(run), create=False).workers()}
    assert beats[dead].get("stopped") and beats[dead].get("reason") == "died", beats[dead]
    # each worker trained on its own share of the cores, the restarted one on the dead one's
    if hasattr(os, "sched_getaffinity"):
        shares = devices.cpu_shares(2, sorted(os.sched_getaffinity(0)))
        cpus: dict[int, set] = {}
        for r in open_store(str(run), create=False).records():
            cpus.setdefault(r["worker"], set()).add(r["device"]["cpus"])
        assert set().union(*cpus.values()) == {",".join(map(str, s)) for s in shares}
        restarted = int(re.search(r"restarted as worker (\d+)", stdout).group(1))
        (survivor,) = set(cpus) - {dead, restarted}
        assert len(cpus[restarted]) == len(cpus[survivor]) == 1
        if len(set(shares)) == 2:  # two cores or more: the shares differ
            assert cpus[restarted] != cpus[survivor]


class _DeadProcess:
    """What `_supervise` sees of a worker process that was SIGKILLed."""

    exitcode = -9
    name = "evojax-nas-worker-0"

    def is_alive(self):
        return False


class _Spawner:
    """A stand-in for the multiprocessing context: records the processes `_supervise` starts
    (each "exits" at once, having done nothing)."""

    def __init__(self):
        self.started = []

    def Process(self, target, args, name):  # noqa: N802 (multiprocessing's name)
        spawner = self

        class Started(_DeadProcess):
            exitcode = 0

            def start(self):
                spawner.started.append(args)

        return Started()


def _supervised(tmp_path, published: bool, reported: int = 2):
    """`_supervise` over one SIGKILLed worker (ID 0, share 2) that reported its first
    `reported` of two children, the second of which reached the store only if `published`
    (background publishing)."""
    import multiprocessing as mp

    from evojax_nas.dna import initial_dna, to_dict
    from evojax_nas.progress import Progress
    from evojax_nas.runner import _Slot, _supervise

    store = open_store(str(tmp_path / "run"))
    ids = ["init-000-000000", "init-000-000001"]
    for ind_id in ids[: 1 + published]:
        store.publish(ind_id, to_dict(initial_dna(3, 10)), {"born": time.time()}, 0.5, None)
    lines = []
    progress = Progress(budget=4, out=None)
    progress.say = lines.append
    for ind_id in ids[:reported]:
        progress.update({"action": "initial", "worker": 0, "id": ind_id})
    slot, spawner = _Slot(_DeadProcess(), 0, 2), _Spawner()
    _supervise(store, spawner, [slot], mp.get_context("spawn").Queue(), progress, None, False)
    return slot, spawner.started, progress, "\n".join(lines)


def test_a_worker_that_died_after_its_share_is_not_redone(tmp_path):
    slot, started, progress, said = _supervised(tmp_path, published=True)
    assert started == [] and slot.finished
    assert progress.children == 2
    assert "worker 0 died (signal 9) after its last child was in the store" in said


def test_a_child_published_but_never_reported_counts_against_the_share(tmp_path):
    """Killed before multiprocessing's feeder thread sent its last report: the store counts."""
    slot, started, progress, said = _supervised(tmp_path, published=True, reported=1)
    assert "worker 0 died after publishing 1 more child than it reported: counted" in said
    assert progress.children == 2 and progress.by_worker[0] == 2
    assert started == [] and slot.finished  # its share of 2 is done: no third child


def test_children_are_attributed_to_the_worker_their_id_names():
    from evojax_nas.evolution import child_id
    from evojax_nas.runner import worker_of

    assert worker_of(child_id(7, 12)) == 7 and worker_of(child_id(123, 0)) == 123
    assert worker_of("init-004-000002") == 4
    assert worker_of("w0x-e000001") is None and worker_of("ancestor") is None


def test_a_child_still_being_published_when_its_worker_died_is_trained_again(tmp_path):
    slot, started, progress, said = _supervised(tmp_path, published=False)
    assert "worker 0 died before init-000-000001 was in the store: it does not count" in said
    assert progress.children == 1 and progress.by_worker[0] == 1
    assert len(started) == 1 and started[0][2] == 1  # the restarted worker's share: 1 child
    assert "worker 0 died (signal 9); restarted as worker" in said
