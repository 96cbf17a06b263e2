"""Job locks shared by the UI and the CLI (they are files in the workspace, so they outlive
any server restart).

* Device lock: one GPU job at a time per device (`locks/cuda-0.lock`, or `locks/cpu.lock`
  when a CPU job asks to be exclusive). Jobs that take it: training, merging on a GPU, and a
  chat model loaded on a GPU. A job that finds the device busy waits in a visible queue (a
  ticket file per waiting job; its position is reported) or, with `wait=False`, is refused
  with the holder named.
* Writer lock: at most one process writes a run directory (`RUN_DIR/.writer.lock`).

Both are OS file locks (filelock -> fcntl): a killed process releases them at once, so a
crash never leaves a stale lock; stale queue tickets (dead pids) are swept by readers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from . import jobs, workspace


class Busy(RuntimeError):
    """The device or run directory is held by another job."""


def _locks_dir() -> Path:
    p = workspace.home() / "locks"
    p.mkdir(parents=True, exist_ok=True)
    return p


def device_key(device: str) -> str:
    """cuda -> cuda-<physical index of the first visible GPU>; anything else -> cpu."""
    if device.startswith("cuda"):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        return f"cuda-{visible}"
    return "cpu"


def _alive(ticket: dict) -> bool:
    return jobs.same_process(ticket.get("pid"), ticket.get("pid_start_time")) is not None


def holder(key: str) -> dict | None:
    path = _locks_dir() / f"{key}.holder.json"
    try:
        info = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return info if _alive(info) else None


def queue(key: str) -> list[dict]:
    """Live waiting jobs in arrival order (dead tickets are removed)."""
    qdir = _locks_dir() / f"{key}.queue"
    out = []
    for t in sorted(qdir.glob("*.json")) if qdir.exists() else []:
        try:
            info = json.loads(t.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if _alive(info):
            out.append(info)
        else:
            t.unlink(missing_ok=True)
    return out


class DeviceLock:
    def __init__(self, device: str, job: str, run_dir: str | os.PathLike | None = None):
        self.key = device_key(device)
        self.lock = FileLock(str(_locks_dir() / f"{self.key}.lock"))
        me = psutil.Process()
        self.info = {"pid": me.pid, "pid_start_time": me.create_time(), "job": job,
                     "run_dir": str(run_dir) if run_dir else None, "since": time.time()}
        self.ticket: Path | None = None

    def acquire(self, wait: bool = True, on_wait=None, poll: float = 0.5) -> None:
        """Take the device; while waiting call on_wait(position, holder) when the position changes."""
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            if not wait:
                h = holder(self.key) or {}
                raise Busy(f"{self.key} is busy with {h.get('job', 'another job')}"
                           f"{' (' + h['run_dir'] + ')' if h.get('run_dir') else ''}; try again when it ends") from None
            qdir = _locks_dir() / f"{self.key}.queue"
            qdir.mkdir(exist_ok=True)
            self.ticket = qdir / f"{time.time():.6f}-{self.info['pid']}.json"
            self.ticket.write_text(json.dumps(self.info))
            last = None
            while True:
                mine = [q["pid"] for q in queue(self.key)]
                pos = mine.index(self.info["pid"]) + 1 if self.info["pid"] in mine else 1
                if on_wait and pos != last:
                    on_wait(pos, holder(self.key))
                    last = pos
                if pos > 1:  # first come, first served: only the head of the queue may take it
                    time.sleep(poll)
                    continue
                try:
                    self.lock.acquire(timeout=poll)
                    break
                except Timeout:
                    pass
            self.ticket.unlink(missing_ok=True)
            self.ticket = None
        (_locks_dir() / f"{self.key}.holder.json").write_text(json.dumps({**self.info, "since": time.time()}))

    def release(self) -> None:
        if self.ticket:
            self.ticket.unlink(missing_ok=True)
        if self.lock.is_locked:
            (_locks_dir() / f"{self.key}.holder.json").unlink(missing_ok=True)
            self.lock.release()


def writer_lock(run_dir: str | os.PathLike) -> FileLock:
    """Hold for the life of the process writing RUN_DIR; a second writer is refused at once."""
    lock = FileLock(str(Path(run_dir) / ".writer.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise Busy(f"{run_dir} is already being written by another process") from None
    return lock
