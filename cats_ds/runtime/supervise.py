"""An exit status you can trust from a `deepspeed` training: the wrapper around the runner.

    python launch/supervise.py deepspeed --num_gpus 2 launch/train.py --deepspeed_config ... --config ...

DeepSpeed's runner passes on only a positive status of its launch process: when the launch
process is killed (kill -9), or the runner itself is, the caller reads 0 or 143 whatever
the ranks did. So each rank of launch/train.py records how it ended in a file of its own
(`record_start` / `record_exit`, in the folder the wrapper names in CATS_OUTCOME_DIR), and
the wrapper, once the runner and every rank it saw are gone (no orphans), exits with

  - the runner's status when it is positive (a rank failed and DeepSpeed passed it on);
  - else 1 when a rank that started ended without recording (killed), naming it;
  - else a rank's failure status, else 75 (preempt.REQUEUE_EXIT) when the ranks stopped
    with latest/ saved, else 0.

SIGTERM, SIGINT and SIGUSR1 to the wrapper (the main process for `docker stop`, systemd,
`kill <pid>`, Ctrl-C) are passed to the ranks as a stop (SIGINT as SIGTERM): they save
latest/ after the current update and the wrapper exits 75. A signal the caller ignores
(launch/slurm/train.sbatch: SLURM signals the ranks itself) stays ignored, also by the
runner. Outside SLURM the runner starts in a session of its own, so a signal to the
wrapper's process group reaches the ranks only through the wrapper (DeepSpeed's launch
process would terminate them, and kill them 30 s later).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import psutil

from cats_ds.runtime.preempt import REQUEUE_EXIT

OUTCOME_DIR_ENV = "CATS_OUTCOME_DIR"
POLL_SECONDS = 0.2
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


# --------------------------------------------------------------------------- rank side


def _outcome_path() -> Optional[Path]:
    folder = os.environ.get(OUTCOME_DIR_ENV)
    return Path(folder) / f"rank{os.environ.get('RANK', '0')}.json" if folder else None


def _record(state: str, exit_code: Optional[int], note: str = "") -> None:
    path = _outcome_path()
    if path is None:
        return
    data = {"rank": int(os.environ.get("RANK", "0")), "pid": os.getpid(), "host": socket.gethostname(),
            "state": state, "exit_code": exit_code, "note": note, "time": time.time()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError as e:  # the wrapper then reports this rank as ended without a record
        print(f"warning: cannot record this rank's outcome in {path}: {e}", file=sys.stderr, flush=True)


def record_start() -> None:
    """This rank runs (the wrapper forwards stop signals to it and waits for it)."""
    _record("running", None)


def record_exit(code: int, note: str = "") -> None:
    """This rank ends with exit status `code` (0 done, 75 stopped with latest/ saved)."""
    _record("done" if code == 0 else "preempted" if code == REQUEUE_EXIT else "failed", code, note)


# --------------------------------------------------------------------------- wrapper side


def read_outcomes(folder: Path) -> dict[int, dict]:
    """rank -> its last record (the files record_start / record_exit wrote)."""
    out = {}
    for f in sorted(folder.glob("rank*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        out[int(rec["rank"])] = rec
    return out


def decide(runner_rc: int, outcomes: dict[int, dict]) -> tuple[int, str]:
    """(exit status, explanation or "") from the runner's status (negative: killed by that
    signal) and the ranks' records."""
    if runner_rc > 0:
        return runner_rc, ""
    runner = "deepspeed exited 0" if runner_rc == 0 else f"deepspeed was killed by {signal.Signals(-runner_rc).name}"
    unrecorded = [r for r in outcomes.values() if r["state"] == "running"]
    if unrecorded:
        who = ", ".join(f"rank {r['rank']} (pid {r['pid']} on {r['host']})" for r in unrecorded)
        return 1, (f"{runner}, but {who} ended without recording how: killed (kill -9, out of memory) or "
                   f"crashed; the training did not finish")
    if not outcomes:
        return (1 if runner_rc == 0 else 128 - runner_rc), (
            f"{runner} and no rank recorded starting (is the script launch/train.py?); the training did not run")
    codes = {r["rank"]: r["exit_code"] for r in outcomes.values()}
    failed = {rank: c for rank, c in codes.items() if c not in (0, REQUEUE_EXIT)}
    if failed:
        rank, code = min(failed.items())
        return code, f"{runner}, but rank {rank} exited {code}"
    if REQUEUE_EXIT in codes.values():
        return REQUEUE_EXIT, f"{runner}; the ranks stopped with latest/ saved: exit {REQUEUE_EXIT} (resume me)"
    return 0, ""


def supervise(cmd: list[str]) -> int:
    import psutil

    folder = Path(tempfile.mkdtemp(prefix="cats_outcome_"))
    env = dict(os.environ, **{OUTCOME_DIR_ENV: str(folder)})
    stops: list[int] = []
    for sig in FORWARDED:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # an ignored signal stays ignored (SLURM sends its own)
            signal.signal(sig, lambda signum, frame: stops.append(signum))
    try:
        runner = subprocess.Popen(cmd, env=env, start_new_session="SLURM_JOB_ID" not in os.environ)
    except OSError as e:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"error: cannot start {cmd[0]}: {e.strerror}", file=sys.stderr, flush=True)
        return 127
    seen: dict[int, psutil.Process] = {}  # launch processes and ranks: waited for before exiting
    signalled: set[int] = set()
    try:
        while True:
            rc = runner.poll()
            if rc is None:
                try:
                    for p in psutil.Process(runner.pid).children(recursive=True):
                        seen.setdefault(p.pid, p)
                except psutil.Error:
                    pass
            outcomes = read_outcomes(folder)
            for rec in outcomes.values():
                if rec["state"] == "running" and rec["pid"] not in seen:
                    try:
                        seen[rec["pid"]] = psutil.Process(rec["pid"])
                    except psutil.Error:
                        pass
            if stops:  # to every rank that has its handlers in place (recorded "running")
                sig = signal.SIGTERM if stops[0] == signal.SIGINT else stops[0]
                for rec in outcomes.values():
                    proc = seen.get(rec["pid"])
                    if rec["state"] == "running" and rec["pid"] not in signalled and proc is not None:
                        try:
                            proc.send_signal(sig)
                        except psutil.Error:
                            pass
                        signalled.add(rec["pid"])
            alive = [p for p in seen.values() if _alive(p)]
            if rc is not None and not alive:
                break
            time.sleep(POLL_SECONDS)
        code, why = decide(rc, read_outcomes(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if why:
        print(f"{'error:' if code not in (0, 75) else '|'} supervise: {why}", file=sys.stderr, flush=True)
    return code


def gone(proc: psutil.Process) -> bool:
    """Exited, killed (a zombie not yet reaped counts as gone) or its pid reused."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _alive(proc) -> bool:
    return not gone(proc)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr if not argv else sys.stdout)
        sys.exit(0 if argv else 2)
    sys.exit(supervise(argv))
