"""One training per train.save_dir: `<save_dir>/train.lock`.

Two trainings on one save_dir would interleave train_log.jsonl and replace each other's
checkpoints. Rank 0 creates the lock file exclusively (O_CREAT | O_EXCL, which shared file
systems honour too) before anything is written there, with the host, pid, the pid's start
time, the start time and SLURM_JOB_ID; it refreshes the file's mtime every REFRESH_S
seconds and deletes it when the run ends. A second training finds it and is refused
(LockError naming the file, host and pid), unless the lock is stale, i.e. its training
is gone without deleting it (kill -9, a crashed node):

  - same host: the pid is not running, or now belongs to a process started at another time;
  - another host: the same SLURM job (a requeued job starting again), or the file was not
    refreshed for STALE_S seconds (its holder cannot be asked directly).

A stale lock is moved aside (rename, so that of two runs breaking it only one does),
reported, and taken.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

LOCK_NAME = "train.lock"
REFRESH_S = 30.0
STALE_S = 300.0
"""A lock of another host not refreshed for this long is stale (10 refresh intervals)."""
_WRITING_S = 10.0
"""An unreadable lock younger than this may be being written: treated as held."""


class LockError(Exception):
    """train.save_dir is in use by another training (or its lock cannot be made)."""


_held: Optional[tuple[Path, str]] = None  # (lock file, token) of this process
_stop_refresh = threading.Event()


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}{job}"


def stale_reason(holder: Optional[dict], age_s: float, stale_s: float = STALE_S) -> Optional[str]:
    """Why the lock `holder` (its JSON; None: unreadable) whose file was last refreshed
    `age_s` seconds ago is stale; None when its training may be running."""
    import psutil

    if holder is None:
        return None if age_s < _WRITING_S else f"unreadable, last written {age_s:.0f} s ago"
    if holder.get("host") == socket.gethostname():
        try:
            proc = psutil.Process(int(holder["pid"]))
            started = proc.create_time()
        except (psutil.Error, KeyError, TypeError, ValueError):
            return f"process {holder.get('pid')} is gone"
        if abs(started - float(holder.get("pid_started", started))) > 1.0:
            return f"pid {holder['pid']} now belongs to another process"
        return None
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job") == job:
        return f"it is an earlier run of this SLURM job ({job}, requeued)"
    if age_s > stale_s:
        return f"not refreshed for {age_s:.0f} s (more than {stale_s:.0f} s)"
    return None


def _read(path: Path) -> tuple[Optional[dict], float]:
    """(JSON of the lock file or None if unreadable, seconds since its mtime); FileNotFoundError."""
    age = time.time() - path.stat().st_mtime
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return (holder if isinstance(holder, dict) else None), age
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, age


def acquire(save_dir: str | Path, stale_s: float = STALE_S, log=print) -> Path:
    """Take <save_dir>/train.lock for this process (creating save_dir); LockError when
    another training holds it. Deleted by release() (also at interpreter exit)."""
    global _held
    save_dir = Path(save_dir)
    path = save_dir / LOCK_NAME
    import psutil

    token = uuid.uuid4().hex
    me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": psutil.Process().create_time(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
          "token": token}
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LockError(f"train.save_dir={save_dir}: cannot create it to lock it: {e.strerror or e}") from None
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder, age = _read(path)
            except FileNotFoundError:
                continue  # released meanwhile
            why = stale_reason(holder, age, stale_s)
            if why is None:
                raise LockError(
                    f"train.save_dir={save_dir} is in use by another training: {path} is held by "
                    f"{_describe(holder) if holder else 'a run that is writing it'} (refreshed {age:.0f} s ago). Two "
                    f"trainings on one save_dir would interleave train_log.jsonl and replace each other's "
                    f"checkpoints. Wait for it to end, choose another train.save_dir, or, if that training is "
                    f"certainly gone, delete {path}") from None
            aside = path.with_name(f"{LOCK_NAME}.stale.{token}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            moved, _ = _read(aside)
            if (moved or {}).get("token") != (holder or {}).get("token"):  # another run replaced it meanwhile
                try:
                    os.link(aside, path)
                except OSError:
                    pass
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            log(f"| removed a stale lock {path} ({_describe(holder) if holder else 'unreadable'}): {why}")
            continue
        except OSError as e:
            raise LockError(f"train.save_dir={save_dir}: cannot create the lock file {path}: "
                            f"{e.strerror or e}") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(me, indent=1) + "\n")
        _held = (path, token)
        _stop_refresh.clear()
        threading.Thread(target=_refresh, args=(path, token), name="save-dir-lock", daemon=True).start()
        atexit.register(release)
        return path
    raise LockError(f"train.save_dir={save_dir}: could not take {path} (other runs kept replacing it)")


def _refresh(path: Path, token: str) -> None:
    while not _stop_refresh.wait(REFRESH_S):
        if _held != (path, token):
            return
        try:
            os.utime(path)
        except OSError:
            pass


def release() -> None:
    """Delete the lock this process holds (if it is still its own)."""
    global _held
    if _held is None:
        return
    path, token = _held
    _held = None
    _stop_refresh.set()
    try:
        holder, _ = _read(path)
        if holder is not None and holder.get("token") == token:
            path.unlink()
    except OSError:
        pass
