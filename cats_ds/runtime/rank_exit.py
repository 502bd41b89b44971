"""How a process that joined a gloo/NCCL process group ends: with its own exit status.

A rank whose work is done (checkpoints fsynced and renamed, model folder written,
process group destroyed) can still be killed on its way out: the interpreter's
teardown destroys the C++ objects that DeepSpeed and torch.distributed still hold
(the process groups DeepSpeed keeps references to, the TCP store and their threads)
in whatever order module clean-up reaches them, and now and then a joinable thread is
destroyed first: "terminate called without an active exception", SIGABRT, and the
launcher reports exit status 250 (-6) for a run that finished. Seen in the CI of this
project twice in one full suite, after "done at step N" had been printed.

`run_rank(main)` gives the entry points of launched processes (launch/train.py,
launch/evaluate.py, launch/analyze.py, their console scripts and the bench workers)
the status Python would have given, without that teardown: it runs `main`, maps its
outcome to a status as the interpreter does (0; SystemExit's code, its message to
stderr; 1 with the traceback for an uncaught exception; SIGINT's own death for an
uncaught KeyboardInterrupt), runs the atexit functions, flushes stdout/stderr and
leaves with os._exit. What the interpreter's teardown would still have done (freeing
memory, joining daemon threads) nobody needs from a process that is ending.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import traceback
from typing import Callable, NoReturn


def exit_status(exc: BaseException | None) -> int:
    """The status the interpreter gives for ending with `exc` (None: returned normally).
    A SystemExit whose code is not an int has its message printed to stderr, as Python does."""
    if exc is None:
        return 0
    if isinstance(exc, SystemExit):
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    traceback.print_exception(exc)
    return 1


def end_process(status: int, interrupted: bool = False) -> NoReturn:
    """Run the atexit functions, flush the standard streams and leave now with `status`
    (or, `interrupted`, die of SIGINT as Python does after an uncaught KeyboardInterrupt)."""
    try:
        atexit._run_exitfuncs()  # e.g. runlock.release; each one's error is printed, as at exit
    except BaseException:  # noqa: BLE001 - nothing may stop the exit
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be said
            pass
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status & 0xFF)  # as the interpreter masks sys.exit(256) or sys.exit(-1)


def run_rank(main: Callable[[], object]) -> NoReturn:
    """Run a launched process' `main` and end it with Python's status for the outcome,
    skipping the interpreter's teardown (see the module doc)."""
    try:
        main()
    except KeyboardInterrupt as e:
        traceback.print_exception(e)
        end_process(1, interrupted=True)
    except BaseException as e:  # noqa: BLE001 - mapped to a status exactly as the interpreter would
        end_process(exit_status(e))
    end_process(0)
