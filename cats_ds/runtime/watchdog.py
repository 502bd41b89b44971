"""Ranks stop when their launcher dies, so no rank trains on orphaned.

`deepspeed` (the runner) starts `python -m deepspeed.launcher.launch` on each node, which
starts one process per rank. The launch process stops its ranks when it gets SIGTERM or
when one rank fails, but nothing stops them when the runner, or the launch process itself,
is killed: kill -9 or SIGTERM to the single-node runner (it installs no handler) leaves the
launch process and every rank running. So each rank polls the launcher processes above it
(the launch process and, on the node where it runs, the runner) from a daemon thread.

When one of them is gone while this node's other ranks (the launch process' other
children) still live, that is a stop like a preemption (`docker stop`, systemd and
`kill <pid>` signal the main process, which is the runner): the watchdog requests a stop
(cats_ds/runtime/preempt.py), the ranks agree after the current update, save `latest/` and exit
75, and a rank still running preempt.STOP_GRACE_SECONDS later is ended. Only when a peer
rank is gone too (no all_reduce can complete) does the rank exit at once (EXIT_CODE).
A process started any other way (plain `python`, a debugger) is not watched: its parent
may be a shell that is meant to go away (nohup).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import psutil

from cats_ds.runtime import preempt, runlock, supervise
from cats_ds.runtime.supervise import gone

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


def siblings(launch: psutil.Process) -> list[psutil.Process]:
    """The other ranks the launch process started on this node (its other children)."""
    try:
        return [p for p in launch.children() if p.pid != os.getpid()]
    except psutil.Error:
        return []


def _exit(label: str, message: str) -> None:
    print(f"error: {label}: {message}", file=sys.stderr, flush=True)
    supervise.record_exit(EXIT_CODE, message)
    runlock.release()  # os._exit skips atexit
    os._exit(EXIT_CODE)


def watch(processes: list[psutil.Process], label: str, poll: float = POLL_SECONDS,
          grace: float = preempt.STOP_GRACE_SECONDS, launch: psutil.Process | None = None) -> threading.Thread:
    """Start a daemon thread that watches `processes` (the launchers above this rank).
    When one is gone: a stop request (cats_ds/runtime/preempt.py: agree, save latest/, exit 75),
    unless one of the peer ranks (the other children of `launch`, as last seen while it
    lived; none if None) is gone too: then this process ends at once (exit code EXIT_CODE,
    a message on stderr). A rank still running `grace` seconds after a launcher went away
    with a stop requested is ended too. os._exit, because the main thread may sit in a
    collective that waits for a rank that will never come."""
    described = [(p, " ".join(_cmdline(p)[:4]) or "?") for p in processes]

    def loop() -> None:
        deadline = None
        peers: list[psutil.Process] = []
        while True:
            if launch is not None and not gone(launch):
                peers = siblings(launch) or peers
            for proc, what in described:
                if deadline is not None or not gone(proc):
                    continue
                missing = [p for p in peers if gone(p)]
                if missing and not preempt.requested.is_set():
                    _exit(label, f"its launcher (pid {proc.pid}: {what}) is gone and so is rank process "
                                 f"pid {missing[0].pid}: no save possible; exiting so that no rank trains on orphaned")
                deadline = time.monotonic() + grace
                if preempt.requested.is_set():
                    print(f"| {label}: its launcher (pid {proc.pid}: {what}) is gone after a stop signal; "
                          f"finishing the save (at most {grace:.0f} s)", file=sys.stderr, flush=True)
                else:
                    print(f"| {label}: its launcher (pid {proc.pid}: {what}) is gone; stopping as on SIGTERM: "
                          f"latest/ is saved after this update (at most {grace:.0f} s)", file=sys.stderr, flush=True)
                    preempt.request(f"launcher pid {proc.pid} gone")
            if deadline is not None and time.monotonic() > deadline:
                _exit(label, f"still running {grace:.0f} s after its launcher went away; exiting")
            time.sleep(poll)

    thread = threading.Thread(target=loop, name="launcher-watchdog", daemon=True)
    thread.start()
    return thread


def watch_launcher() -> list[psutil.Process]:
    """Watch this rank's DeepSpeed launcher processes (if any); returns them."""
    chain = launcher_chain()
    if chain:
        watch(chain, f"rank {os.environ.get('RANK', '?')}", launch=chain[0],
              poll=float(os.environ.get("CATS_WATCHDOG_POLL_S", POLL_SECONDS)))
    return chain
