"""runtime/rank_exit.py: a launched process ends with the status Python would give its outcome,
without the interpreter's teardown (where a finished gloo rank could abort)."""

import signal
import subprocess
import sys
import textwrap

import pytest

from cats_ds.runtime.rank_exit import exit_status

PRELUDE = """
import atexit, os, sys
from cats_ds.runtime.rank_exit import run_rank

class AbortsInTeardown:
    # stands in for a C++ object destroyed out of order at interpreter exit (SIGABRT)
    def __del__(self):
        os.abort()

KEEP = AbortsInTeardown()
atexit.register(lambda: print("atexit ran", flush=False))
"""


def run_script(body: str, under_run_rank: bool = True) -> subprocess.CompletedProcess:
    main = "run_rank(main)" if under_run_rank else "main()"
    code = PRELUDE + textwrap.dedent(body) + f"\n{main}\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_plain_exit_aborts_in_teardown_run_rank_does_not():
    body = """
    def main():
        sys.stdout.write("work done")  # no newline, no flush: must still come out
    """
    plain = run_script(body, under_run_rank=False)
    assert plain.returncode == -signal.SIGABRT  # the failure mode, reproduced
    ours = run_script(body)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == "work doneatexit ran\n"


@pytest.mark.parametrize("raise_, status, err", [
    ("sys.exit(3)", 3, ""),
    ("sys.exit(None)", 0, ""),
    ("sys.exit(256 + 7)", 7, ""),
    ("sys.exit('error: bad key train.lr')", 1, "error: bad key train.lr"),
    ("raise ValueError('boom')", 1, "ValueError: boom"),
])
def test_status_as_python_gives_it(raise_, status, err):
    res = run_script(f"""
    def main():
        print("before")
        {raise_}
    """)
    assert res.returncode == status, res.stderr
    assert res.stdout == "before\natexit ran\n"
    assert err in res.stderr
    if "ValueError" in raise_:
        assert "Traceback" in res.stderr


def test_keyboard_interrupt_dies_of_sigint():
    res = run_script("""
    def main():
        raise KeyboardInterrupt
    """)
    assert res.returncode == -signal.SIGINT
    assert "KeyboardInterrupt" in res.stderr
    assert "atexit ran" in res.stdout


def test_exit_status_mapping():
    assert exit_status(None) == 0
    assert exit_status(SystemExit(0)) == 0
    assert exit_status(SystemExit(75)) == 75
    assert exit_status(RuntimeError("x")) == 1
