"""What happens when things go wrong (README): orphaned ranks, non-finite training,
interrupted saves, resume mismatches, corrupt files. Ranks are real gloo ranks under the
real `deepspeed` launcher where ranks matter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import REPO, ds_config, free_port, read_log, write_json

TRAIN = "launch/train.py"


def wait_for(condition, timeout: float, what: str, poll: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --------------------------------------------------------------------------- 1. orphans


WATCHED = """
import sys, time, psutil
from cats_ds.watchdog import watch
watch([psutil.Process(int(sys.argv[1]))], "rank test", poll=0.1)
print("watching", flush=True)
time.sleep(60)
"""

PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(__import__("os").getpid())])
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_watchdog_exits_when_the_watched_process_dies(tmp_path, sig):
    err = open(tmp_path / "err.txt", "w")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, WATCHED], stdout=subprocess.PIPE, stderr=err,
                              text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    child = psutil.Process(int(parent.stdout.readline()))
    assert parent.stdout.readline() == "watching\n" and child.is_running()
    parent.send_signal(sig)
    parent.wait(10)
    child.wait(10)  # psutil.TimeoutExpired if it is still running
    text = (tmp_path / "err.txt").read_text()
    assert f"error: rank test: its launcher (pid {parent.pid}" in text and "is gone" in text


def test_ranks_exit_when_the_deepspeed_runner_is_killed(tmp_path, tiny_recipe):
    """kill -9 to the `deepspeed` runner alone: the launch process and both ranks go too."""
    recipe = tiny_recipe("orphan", train={"max_updates": 100000, "valid_every": 100000})
    ds = write_json(tmp_path / "z2.json", ds_config(2))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    port = free_port()
    out = open(tmp_path / "out.txt", "w")
    runner = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                               "--master_port", str(port), TRAIN, "--deepspeed_config", str(ds),
                               "--config", str(recipe)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        log = tmp_path / "orphan" / "train_log.jsonl"
        wait_for(lambda: log.is_file() and log.read_text().count("\n") >= 2, 120, "two logged updates")
        tree = psutil.Process(runner.pid).children(recursive=True)
        launchers = [p for p in tree if "deepspeed.launcher.launch" in p.cmdline()]
        ranks = [p for p in tree if p not in launchers and TRAIN in p.cmdline()]
        assert len(launchers) == 1 and len(ranks) == 2 and len(tree) == 3
        runner.kill()
        runner.wait()
        gone, alive = psutil.wait_procs(tree, timeout=20)
        assert not alive, f"still running after the runner was killed: {alive}"
        text = (tmp_path / "out.txt").read_text()
        assert "its launcher (pid" in text and "is gone; exiting" in text
    finally:
        for p in psutil.Process(os.getpid()).children(recursive=True):
            p.kill()
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            leftover.unlink(missing_ok=True)
