"""One training per train.save_dir (cats_ds/runtime/runlock.py): <save_dir>/train.lock with host and
pid; a second training is refused, naming them; a lock left by a killed run is stale and
taken over. Real gloo ranks under the real `deepspeed` launcher for the two-run case."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cats_ds.runtime import runlock
from cats_ds.runtime.runlock import LOCK_NAME, LockError, acquire, release, stale_reason
from helpers import REPO, ds_config, free_port, read_log, write_json

TRAIN = "launch/train.py"

HOLDER = """
import sys, time
from cats_ds.runtime.runlock import acquire
acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def hold(save_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(save_dir)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_a_held_lock_is_refused_naming_host_and_pid_and_a_killed_holders_lock_is_taken(tmp_path):
    save_dir = tmp_path / "run"
    holder = hold(save_dir)
    try:
        lock = json.loads((save_dir / LOCK_NAME).read_text())
        assert lock["host"] == socket.gethostname() and lock["pid"] == holder.pid
        with pytest.raises(LockError) as e:
            acquire(save_dir)
        assert (f"train.save_dir={save_dir} is in use by another training: {save_dir / LOCK_NAME} is held by "
                f"pid {holder.pid} on {socket.gethostname()}, started ") in str(e.value)
        assert f"if that training is certainly gone, delete {save_dir / LOCK_NAME}" in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    assert (save_dir / LOCK_NAME).is_file()  # kill -9: nobody deleted it
    said = []
    try:
        assert acquire(save_dir, log=said.append) == save_dir / LOCK_NAME
        assert json.loads((save_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert said == [f"| removed a stale lock {save_dir / LOCK_NAME} (pid {holder.pid} on {socket.gethostname()}, "
                        f"started {lock['started']}): process {holder.pid} is gone"]
        assert [p.name for p in save_dir.iterdir()] == [LOCK_NAME]
    finally:
        release()
    assert not (save_dir / LOCK_NAME).exists()


def test_release_deletes_only_its_own_lock(tmp_path):
    acquire(tmp_path)
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "another run's"}))
    finally:
        release()
    assert (tmp_path / LOCK_NAME).is_file()


def test_stale_rules(monkeypatch):
    me = psutil.Process()
    here = {"host": socket.gethostname(), "pid": me.pid, "pid_started": me.create_time(), "slurm_job": ""}
    assert stale_reason(here, age_s=10_000) is None  # alive on this host: however old its mtime
    assert stale_reason(dict(here, pid_started=me.create_time() - 100), 0) == \
        f"pid {me.pid} now belongs to another process"
    far = {"host": "node-elsewhere", "pid": 123, "pid_started": 0.0, "slurm_job": "77"}
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert stale_reason(far, age_s=60, stale_s=300) is None
    assert stale_reason(far, age_s=301, stale_s=300) == "not refreshed for 301 s (more than 300 s)"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert stale_reason(far, age_s=1) == "it is an earlier run of this SLURM job (77, requeued)"
    assert stale_reason(None, age_s=1) is None  # being written
    assert stale_reason(None, age_s=60) == "unreadable, last written 60 s ago"


def test_the_lock_is_refreshed_while_held(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "REFRESH_S", 0.1)
    path = acquire(tmp_path)
    try:
        os.utime(path, (time.time() - 1000, time.time() - 1000))
        time.sleep(0.5)
        assert time.time() - path.stat().st_mtime < 5
    finally:
        release()


def test_a_second_training_on_one_save_dir_is_refused_and_a_kill_9_leaves_a_stale_lock(tmp_path, tiny_recipe):
    """Run A trains; run B on the same save_dir (another master port) exits 2 naming the lock,
    the host and A's rank-0 pid, and A goes on. kill -9 of all of A's processes leaves the
    lock behind; run C takes it over as stale and resumes from A's latest/."""
    ds = write_json(tmp_path / "z2.json", ds_config(2))
    recipe = tiny_recipe("run", train={"max_updates": 100000, "valid_every": 2})
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    ports = []

    def cmd(*extra):
        ports.append(free_port())
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(ports[-1]), TRAIN, "--deepspeed_config", str(ds), "--config", str(recipe), *extra]

    a = subprocess.Popen(cmd(), cwd=REPO, env=env, stdout=open(tmp_path / "a.txt", "w"), stderr=subprocess.STDOUT,
                         start_new_session=True)
    tree: list[psutil.Process] = []
    save_dir = tmp_path / "run"
    try:
        end = time.time() + 120
        while not (save_dir / "latest" / "cats_ds.json").is_file():
            assert a.poll() is None and time.time() < end, (tmp_path / "a.txt").read_text()[-3000:]
            time.sleep(0.2)
        tree = psutil.Process(a.pid).children(recursive=True)
        rank0 = next(p for p in tree if p.environ().get("RANK") == "0" and TRAIN in p.cmdline())
        b = subprocess.run(cmd(), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert b.returncode == 2, b.stderr[-3000:]
        assert (f"error: train.save_dir={save_dir} is in use by another training: {save_dir / LOCK_NAME} is held by "
                f"pid {rank0.pid} on {socket.gethostname()}") in b.stderr
        assert "Traceback" not in b.stderr
        assert a.poll() is None  # A was not disturbed
        steps = [r["step"] for r in read_log(save_dir)]
        assert steps == list(range(1, len(steps) + 1))  # one run's log, not two interleaved
        for p in [psutil.Process(a.pid)] + tree:
            p.kill()
        a.wait()
        psutil.wait_procs(tree, timeout=30)
    finally:
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if a.poll() is None:
            a.kill()
            a.wait()
        for leftover in (f for port in ports for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")):
            leftover.unlink(missing_ok=True)
    assert json.loads((save_dir / LOCK_NAME).read_text())["pid"] == rank0.pid
    step = json.loads((save_dir / "latest" / "cats_ds.json").read_text())["step"]
    c = subprocess.run(cmd(f"train.max_updates={step + 1}"), cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert c.returncode == 0, c.stderr[-3000:]
    assert (f"| removed a stale lock {save_dir / LOCK_NAME} (pid {rank0.pid} on {socket.gethostname()}, "
            f"started ") in c.stdout and f"process {rank0.pid} is gone" in c.stdout
    assert f"resumed from {save_dir / 'latest'} at step {step}" in c.stdout
    assert not (save_dir / LOCK_NAME).exists()
