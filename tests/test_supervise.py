"""launch/supervise.py (cats_ds/runtime/supervise.py): an exit status that says how the ranks ended,
also when DeepSpeed's runner cannot tell (its launch process killed: it returns 0), and a
SIGTERM to the main process that saves latest/. Fake runners and ranks for the rules;
real gloo ranks under the real `deepspeed` launcher for kill -9 of the launch process;
`python launch/train.py` without a launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cats_ds.runtime.preempt import REQUEUE_EXIT
from cats_ds.runtime.supervise import decide
from helpers import REPO, ds_config, free_port, kill_processes, read_log, wait_for_updates, write_json

TRAIN = "launch/train.py"
SUPERVISE = "launch/supervise.py"

# stands in for `deepspeed`: starts one fake rank per argument and exits FAKE_RC whatever they do,
# as DeepSpeed's runner does when its launch process was killed (it passes on positive codes only)
FAKE_RUNNER = """
import os, subprocess, sys
ranks = [subprocess.Popen([sys.executable, "-c", sys.argv[1], how], env=dict(os.environ, RANK=str(i)))
         for i, how in enumerate(sys.argv[2:])]
print(" ".join(str(r.pid) for r in ranks), flush=True)
for r in ranks:
    r.wait()
sys.exit(int(os.environ.get("FAKE_RC", "0")))
"""
FAKE_RANK = """
import os, signal, sys
from cats_ds.runtime import preempt, supervise
preempt.install()
supervise.record_start()
how = sys.argv[1]
if how == "vanish":  # kill -9: nothing recorded
    os.kill(os.getpid(), signal.SIGKILL)
code = {"done": 0, "fail": 2}.get(how)
if how == "stop":  # the training loop: a stop request, then latest/ saved and exit 75
    code = 75 if preempt.requested.wait(60) else 0
os.write(1, f"rank {os.environ['RANK']} stops on {preempt.received}\\n".encode())  # one write: ranks share stdout
supervise.record_exit(code)
sys.exit(code)
"""


def supervise_fake(tmp_path: Path, ranks: list[str], rc: int = 0, signal_after_start=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), FAKE_RC=str(rc))
    # SIGINT at its default in the wrapper: a shell that starts pytest in the background
    # (`pytest ... &`) leaves SIGINT ignored, and the wrapper keeps an ignored signal ignored
    proc = subprocess.Popen([sys.executable, SUPERVISE, sys.executable, "-c", FAKE_RUNNER, FAKE_RANK] + ranks,
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pids = [int(p) for p in proc.stdout.readline().split()]
    if signal_after_start is not None:
        time.sleep(2.0)  # the fake ranks have recorded themselves
        proc.send_signal(signal_after_start)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err, pids


def test_decide_trusts_the_ranks_records_over_a_runner_that_says_0():
    def rec(rank, state, code=None):
        return {"rank": rank, "pid": 100 + rank, "host": "h", "state": state, "exit_code": code}

    assert decide(2, {0: rec(0, "failed", 2)}) == (2, "")  # DeepSpeed passed a failure on
    assert decide(0, {0: rec(0, "done", 0), 1: rec(1, "done", 0)}) == (0, "")
    code, why = decide(0, {0: rec(0, "preempted", 75), 1: rec(1, "preempted", 75)})
    assert code == REQUEUE_EXIT and "deepspeed exited 0; the ranks stopped with latest/ saved" in why
    code, why = decide(-signal.SIGTERM, {0: rec(0, "preempted", 75)})
    assert code == REQUEUE_EXIT and why.startswith("deepspeed was killed by SIGTERM")
    code, why = decide(0, {0: rec(0, "done", 0), 1: rec(1, "running")})
    assert code == 1 and "rank 1 (pid 101 on h) ended without recording how" in why
    assert decide(0, {0: rec(0, "preempted", 75), 1: rec(1, "failed", 1)})[0] == 1
    code, why = decide(0, {})
    assert code == 1 and "no rank recorded starting" in why
    assert decide(-signal.SIGKILL, {})[0] == 128 + signal.SIGKILL


@pytest.mark.parametrize("ranks, want", [(["done", "done"], 0), (["vanish", "done"], 1), (["fail", "done"], 2)])
def test_supervise_exit_status_when_the_runner_returns_0(tmp_path, ranks, want):
    rc, out, err, pids = supervise_fake(tmp_path, ranks)
    assert rc == want, err
    if want == 1:
        assert f"error: supervise: deepspeed exited 0, but rank 0 (pid {pids[0]} on " in err
        assert "ended without recording how" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_supervise_passes_a_stop_signal_to_the_ranks_and_exits_75(tmp_path, sig):
    """`docker stop`/`kill <pid>` (SIGTERM) or Ctrl-C (SIGINT) to the wrapper: every rank gets
    SIGTERM, stops (saving latest/ in a real run) and the wrapper exits 75, though the
    runner returns 0."""
    rc, out, err, pids = supervise_fake(tmp_path, ["stop", "stop"], signal_after_start=sig)
    assert rc == REQUEUE_EXIT, err
    assert sorted(out.splitlines()) == ["rank 0 stops on ['SIGTERM']", "rank 1 stops on ['SIGTERM']"]
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_supervise_leaves_a_signal_the_caller_ignores_ignored(tmp_path):
    """launch/slurm/train.sbatch ignores SIGTERM/SIGUSR1 for the launcher processes (SLURM
    signals the ranks itself): the wrapper neither acts on them nor lets its runner die of them."""
    probe = "import signal; print(sorted(s.name for s in (signal.SIGTERM, signal.SIGUSR1) " \
            "if signal.getsignal(s) == signal.SIG_IGN))"
    done = subprocess.run(["bash", "-c", f'trap "" TERM USR1; exec "{sys.executable}" {SUPERVISE} '
                                         f'"{sys.executable}" -c \'{probe}\''],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=60)
    assert done.stdout == "['SIGTERM', 'SIGUSR1']\n"
    assert done.returncode == 1 and "no rank recorded starting" in done.stderr  # not a training


# --------------------------------------------------------------------------- real ranks


def start_supervised(args: list, out: Path) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               CATS_WATCHDOG_POLL_S="0.1", PYTHONPATH=str(REPO))
    port = free_port()
    cmd = [sys.executable, SUPERVISE, sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
           "--master_port", str(port)] + [str(a) for a in args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(out, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True), port


def test_kill_9_of_the_launch_process_saves_and_the_wrapper_exits_75(tmp_path, tiny_recipe):
    """kill -9 of DeepSpeed's launch process (the middle one): `deepspeed` returns 0. The
    ranks' watchdogs find their launcher gone while both ranks live, so they stop as on
    SIGTERM: agree, save latest/ at the update reached, exit 75; the wrapper waits for
    them (no orphans) and exits 75 from their records."""
    ds = write_json(tmp_path / "z2.json", ds_config(2))
    recipe = tiny_recipe("run", train={"max_updates": 100000, "valid_every": 100000})
    proc, port = start_supervised([TRAIN, "--deepspeed_config", ds, "--config", recipe], tmp_path / "out.txt")
    tree: list[psutil.Process] = []
    try:
        wait_for_updates(tmp_path / "run", 2, proc)
        tree = psutil.Process(proc.pid).children(recursive=True)
        launch = [p for p in tree if "deepspeed.launcher.launch" in p.cmdline()]
        assert len(launch) == 1 and len(tree) == 4  # runner, launch, 2 ranks
        launch[0].kill()
        rc = proc.wait(120)
        gone, alive = psutil.wait_procs(tree, timeout=5)
        assert not alive, f"still running: {alive}"
    finally:
        kill_processes(tree + ([psutil.Process(proc.pid)] if proc.poll() is None else []), port)
    text = (tmp_path / "out.txt").read_text()
    assert rc == REQUEUE_EXIT, text[-4000:]
    step = json.loads((tmp_path / "run" / "latest" / "cats_ds.json").read_text())["step"]
    assert read_log(tmp_path / "run")[-1]["step"] == step >= 2
    assert f"is gone; stopping as on SIGTERM" in text
    assert f"stopped at step {step}, latest/ saved; exit {REQUEUE_EXIT}" in text
    assert "| supervise: deepspeed exited 0; the ranks stopped with latest/ saved" in text, text[-3000:]
    assert not (tmp_path / "run" / "train.lock").exists()


def test_train_py_without_a_launcher_runs_as_one_process(tmp_path, tiny_recipe):
    """`python launch/train.py ...`: DeepSpeed looked for MPI (an mpi4py traceback); now one
    process trains, and the output says how to start several ranks."""
    ds = write_json(tmp_path / "z0.json", ds_config(0))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "SLURM_PROCID")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, TRAIN, "--deepspeed_config", str(ds), "--config",
                           str(tiny_recipe("one", train={"max_updates": 2}))], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| not started by a launcher: training as one process (rank 0 of 1). For N ranks: `deepspeed " \
           "--num_gpus N launch/train.py" in done.stdout
    assert "mpi4py" not in done.stderr and "world 1" in done.stdout
    assert json.loads((tmp_path / "one" / "latest" / "cats_ds.json").read_text())["step"] == 2
