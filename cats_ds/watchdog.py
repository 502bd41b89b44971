"""Ranks exit when their launcher dies, so no rank trains on orphaned.

`deepspeed` (the runner) starts `python -m deepspeed.launcher.launch` on each node, which
starts one process per rank. The launch process stops its ranks when it gets SIGTERM or
when one rank fails, but nothing stops them when the runner, or the launch process itself,
is killed: kill -9 or SIGTERM to the single-node runner (it installs no handler) leaves the
launch process and every rank running. So each rank polls the launcher processes above it
(the launch process and, on the node where it runs, the runner) from a daemon thread and
exits at once when one of them is gone; the launch process then sees a failed rank and
stops the others. A process started any other way (plain `python`, a debugger) is not
watched: its parent may be a shell that is meant to go away (nohup).

A rank that received SIGTERM/SIGUSR1 (cats_ds/preempt.py) is saving `latest` on its way
out; a signal to the whole process group also kills the runner, so such a rank gets up to
preempt.STOP_GRACE_SECONDS after its launcher is gone before the watchdog ends it.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import psutil

from cats_ds import preempt

POLL_SECONDS = 1.0
"""Seconds between checks; the environment variable CATS_WATCHDOG_POLL_S overrides it."""
EXIT_CODE = 1

_LAUNCH_MODULE = "deepspeed.launcher.launch"
_RUNNER_MODULE = "deepspeed.launcher.runner"


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.Error, OSError):
        return []


def is_launch(proc: psutil.Process) -> bool:
    """DeepSpeed's per-node launch process (`python -u -m deepspeed.launcher.launch ...`)."""
    return _LAUNCH_MODULE in _cmdline(proc)


def is_runner(proc: psutil.Process) -> bool:
    """The `deepspeed` command (`python .../bin/deepspeed ...` or `python -m deepspeed.launcher.runner`)."""
    cmd = _cmdline(proc)
    return _RUNNER_MODULE in cmd or any(os.path.basename(a) == "deepspeed" for a in cmd[:2])


def launcher_chain() -> list[psutil.Process]:
    """The launcher processes above this one: [launch] or [launch, runner]; [] when this
    process was not started by DeepSpeed's launch module."""
    try:
        parent = psutil.Process(os.getppid())
    except psutil.Error:
        return []
    if not is_launch(parent):
        return []
    chain = [parent]
    try:
        grand = parent.parent()
    except psutil.Error:
        grand = None
    if grand is not None and is_runner(grand):
        chain.append(grand)
    return chain


def gone(proc: psutil.Process) -> bool:
    """Exited, killed (a zombie not yet reaped counts as gone) or its pid reused."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def watch(processes: list[psutil.Process], label: str, poll: float = POLL_SECONDS,
          grace: float = preempt.STOP_GRACE_SECONDS) -> threading.Thread:
    """Start a daemon thread that ends this process (exit code EXIT_CODE, a message on
    stderr) as soon as one of `processes` is gone, or `grace` seconds later when a stop
    signal was received (the rank is saving latest/ and exits by itself when done).
    os._exit, because the main thread may sit in a collective that waits for a rank that
    will never come."""
    described = [(p, " ".join(_cmdline(p)[:4]) or "?") for p in processes]

    def loop() -> None:
        deadline = None
        while True:
            for proc, what in described:
                if deadline is None and gone(proc):
                    if not preempt.requested.is_set():
                        print(f"error: {label}: its launcher (pid {proc.pid}: {what}) is gone; exiting so that "
                              f"no rank trains on orphaned", file=sys.stderr, flush=True)
                        os._exit(EXIT_CODE)
                    deadline = time.monotonic() + grace
                    print(f"| {label}: its launcher (pid {proc.pid}: {what}) is gone after a stop signal; "
                          f"finishing the save (at most {grace:.0f} s)", file=sys.stderr, flush=True)
            if deadline is not None and time.monotonic() > deadline:
                print(f"error: {label}: still running {grace:.0f} s after its launcher went away; exiting",
                      file=sys.stderr, flush=True)
                os._exit(EXIT_CODE)
            time.sleep(poll)

    thread = threading.Thread(target=loop, name="launcher-watchdog", daemon=True)
    thread.start()
    return thread


def watch_launcher() -> list[psutil.Process]:
    """Watch this rank's DeepSpeed launcher processes (if any); returns them."""
    chain = launcher_chain()
    if chain:
        watch(chain, f"rank {os.environ.get('RANK', '?')}", poll=float(os.environ.get("CATS_WATCHDOG_POLL_S",
                                                                                     POLL_SECONDS)))
    return chain
