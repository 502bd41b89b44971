"""Preemption: SIGTERM / SIGUSR1 -> a clean save of `latest` and an exit that asks for a requeue.

SLURM sends SIGTERM before it kills or preempts a job, and the signal `--signal=USR1@T`
asks for T seconds before the time limit. Every rank installs `install()`'s handler, which
only sets a flag (a handler must not touch DeepSpeed or the network). The training loop
reads the flag after each update and folds it into the per-update all_reduce it already
does (the non-finite check, MAX over ranks), so all ranks stop after the same update, save
`latest` (the usual atomic save) and exit with REQUEUE_EXIT. A rank whose signal arrives
while another rank is inside a collective is fine: the flag waits for the next boundary.

The watchdog (cats_ds/runtime/watchdog.py) treats a launcher that is gone while this node's
ranks live (SIGTERM or kill -9 to the `deepspeed` runner, which installs no handler;
kill -9 of DeepSpeed's launch process) as the same stop request (`request`); once a stop
was requested it gives the rank STOP_GRACE_SECONDS to finish that update and the save
before it ends it.
"""

from __future__ import annotations

import signal
import threading

REQUEUE_EXIT = 75
"""Exit status of a rank (and of the launcher, which passes on a rank's non-zero status)
that stopped on SIGTERM/SIGUSR1 after saving `latest`: EX_TEMPFAIL, "try again".
launch/slurm/train.sbatch requeues the job when srun returns it."""

STOP_GRACE_SECONDS = 600.0
"""How long the watchdog lets a rank that received a stop signal outlive its launcher."""

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

requested = threading.Event()
"""Set by the handler; read by the training loop (after each update) and the watchdog."""
received: list[str] = []
"""Names of the signals received, in order (for the log line)."""


def _handler(signum, frame) -> None:
    received.append(signal.Signals(signum).name)
    requested.set()


def install() -> None:
    """Catch SIGTERM and SIGUSR1 in this process (main thread only: Python's rule)."""
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def request(reason: str) -> None:
    """A stop request from inside the process (the watchdog, when its launcher is gone):
    the same path as a signal; `reason` names it in the log line."""
    received.append(reason)
    requested.set()


def reset() -> None:
    """Forget a request (a new run in the same process, e.g. tests)."""
    requested.clear()
    received.clear()
