"""Which processes this app started, so that a signal only ever reaches one of them.

A run's run.json says which pid runs it, but anyone who can write the run's folder can write
run.json: a pid and process group there are a claim, never a target. A launch is recorded here,
in the workspace ($LORASTUDIO_HOME/jobs/, written only by this app's own processes), with the
process's pid, start time, command line and a random job token that every process of the job
inherits in its environment (LORASTUDIO_JOB). Before any signal:

* `live(run_dir)`: the recorded process, if it still runs with the same start time and command line;
* `members(record)`: every process whose environment holds the job's token (the launcher, its
  ranks, a rank still starting, an orphan whose parent died), found wherever they are in the
  process tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import time
from pathlib import Path

import psutil

from . import safe_io, workspace

TOKEN_ENV = "LORASTUDIO_JOB"


def _dir() -> Path:
    p = workspace.home() / "jobs"
    p.mkdir(parents=True, exist_ok=True)
    return p


def _path(run_dir: str | os.PathLike) -> Path:
    key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:24]
    return _dir() / f"{key}.json"


def new_token() -> str:
    return secrets.token_hex(12)


def register(run_dir: str | os.PathLike, pid: int, token: str, cmdline: list[str] | None = None,
             kind: str = "training") -> dict:
    """Record a process this app just started for RUN_DIR: the command line it was started with
    (or, for a process recording itself, the one the OS shows) and its start time."""
    p = psutil.Process(pid)
    rec = {"run_dir": str(Path(run_dir).resolve()), "pid": pid, "pgid": os.getpgid(pid),
           "create_time": p.create_time(), "cmdline": list(cmdline or p.cmdline()), "token": token,
           "kind": kind, "registered": time.time()}
    path = _path(run_dir)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, path)
    return rec


def record(run_dir: str | os.PathLike) -> dict | None:
    try:
        rec = safe_io.read_json(_path(run_dir), 1 << 20)
    except safe_io.FileProblem:
        return None
    if not isinstance(rec, dict) or rec.get("run_dir") != str(Path(run_dir).resolve()):
        return None
    return rec


def forget(run_dir: str | os.PathLike) -> None:
    """The run is gone (deleted): so is its record."""
    _path(run_dir).unlink(missing_ok=True)


def same_process(pid, create_time, cmdline: list[str] | None = None) -> psutil.Process | None:
    """The one liveness check: the process PID if it is still the one that was recorded (its start
    time, and its command line when given: a reused pid is another process), not a zombie."""
    try:
        p = psutil.Process(int(pid))
        if abs(p.create_time() - float(create_time)) >= 0.01 or p.status() == psutil.STATUS_ZOMBIE:
            return None
        if cmdline is None:
            return p
        shown = p.cmdline()
        # a process just started can show an empty command line for a while (its exec still
        # settling: 49 of 300 reads right after Popen returned, Linux 6.18): the pid and its
        # start time, matched above, still name that one process
        return p if shown == list(cmdline) or not shown else None
    except (psutil.Error, TypeError, ValueError, OverflowError):
        return None


def live(run_dir: str | os.PathLike, rec: dict | None = None) -> psutil.Process | None:
    """The recorded process of RUN_DIR's job, if it is still that very process."""
    rec = rec or record(run_dir)
    if not rec or not isinstance(rec.get("cmdline"), list):
        return None
    return same_process(rec.get("pid"), rec.get("create_time"), rec["cmdline"])


def members(rec: dict | None) -> list[psutil.Process]:
    """Every live process carrying the job's token (never this process)."""
    token = (rec or {}).get("token")
    if not token:
        return []
    out = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get(TOKEN_ENV) == token and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def signal_group(rec: dict, sig: int) -> bool:
    """Signal the recorded process group, if its leader is still the recorded process."""
    p = live(rec["run_dir"], rec)
    if p is None:
        return False
    try:
        if os.getpgid(p.pid) != rec["pgid"]:
            p.send_signal(sig)  # not a group leader any more: the process alone
        else:
            os.killpg(rec["pgid"], sig)
    except (ProcessLookupError, PermissionError, psutil.Error):
        return False
    return True


def kill_members(rec: dict | None, within: float = 5.0) -> int:
    """SIGKILL every process of the job, again until none is left (a launcher may still be
    starting ranks); returns how many were killed."""
    killed: set[int] = set()
    deadline = time.time() + within
    while True:
        found = members(rec)
        for p in found:
            try:
                p.send_signal(signal.SIGKILL)
                killed.add(p.pid)
            except psutil.Error:
                pass
        if not found or time.time() > deadline:
            return len(killed)
        time.sleep(0.1)
