"""The run directory contract, shared by the trainer child, the CLI, the web UI and tests.

    RUN_DIR/config.yaml     every resolved value (`lorastudio train RUN_DIR/config.yaml` reruns it)
    RUN_DIR/run.json        status, pid + process start time, versions, dataset hash, exit code
    RUN_DIR/metrics.jsonl   append-only events: start, step, eval, sample, checkpoint, end/failed
    RUN_DIR/train.log       the child's stdout + stderr (never a pipe nobody drains)
    RUN_DIR/adapter/        the trained adapter (PEFT folder), or model/ for full fine-tuning
    RUN_DIR/checkpoint-N/   Trainer checkpoints (last K kept), what `resume` continues from

A child runs in its own process group so Stop can signal the whole tree. Whoever reads a run
checks the recorded pid *and* its start time, so a dead child (or a reused pid) reads as failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil

from . import workspace

EXIT_DONE, EXIT_FAILED, EXIT_CONFIG, EXIT_STOPPED = 0, 1, 2, 3
ACTIVE = ("queued", "starting", "running", "stopping")


# ---------------------------------------------------------------- run.json and metrics.jsonl

def read_json(run_dir: str | Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "run.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _json_lock(run_dir: str | Path):
    """run.json has several writers (the child or rank 0, Stop, a reader marking a dead run
    failed, the queue): each read-modify-write holds this lock, or one could undo another's
    update (a late `stop_requested` write putting back `running` over the child's `stopped`)."""
    from filelock import FileLock

    return FileLock(str(Path(run_dir) / ".run.json.lock"), timeout=30)


def write_json(run_dir: str | Path, **updates) -> dict:
    """Merge updates into run.json atomically (under the lock; temp file, then rename)."""
    with _json_lock(run_dir):
        return _write_unlocked(run_dir, updates)


def _write_unlocked(run_dir: str | Path, updates: dict) -> dict:
    path = Path(run_dir) / "run.json"
    data = read_json(run_dir)
    data.update(updates)
    data["updated"] = time.time()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
    return data


def append_event(run_dir: str | Path, event: str, **fields) -> dict:
    rec = {"event": event, "time": round(time.time(), 3), **fields}
    line = json.dumps(rec, default=float) + "\n"
    # One write() call per line in append mode: readers never see half a record.
    with open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(line)
    return rec


def read_events(run_dir: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """Events from byte `offset` on, and the new offset (for incremental tailing by the UI)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # ignore a line still being written
    events = []
    for line in data[:end].splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events, offset + end


def log_tail(run_dir: str | Path, n: int = 20) -> list[str]:
    path = Path(run_dir) / "train.log"
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 64 * 1024))
        lines = f.read().decode("utf-8", "replace").splitlines()
    return lines[-n:]


# ---------------------------------------------------------------- liveness

def process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def is_alive(info: dict) -> bool:
    pid, started = info.get("pid"), info.get("pid_start_time")
    if not pid:
        return False
    now_started = process_start_time(pid)
    if now_started is None:
        return False
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        return False
    # a reused pid has a different start time
    return started is None or abs(now_started - started) < 1.0


def status(run_dir: str | Path) -> dict:
    """run.json, corrected: an active run whose process is gone is marked failed (and its
    orphaned process group, if any, is killed)."""
    run_dir = Path(run_dir)
    info = read_json(run_dir)
    if info.get("status") in ACTIVE and info.get("pid") and not is_alive(info):
        with _json_lock(run_dir):
            info = read_json(run_dir)  # again, under the lock: the child may have just written its end
            if info.get("status") not in ACTIVE or is_alive(info):
                return info
            _kill_group(info.get("pgid"))
            tail = log_tail(run_dir, 10)
            info = _write_unlocked(run_dir, dict(status="failed", error="the training process died unexpectedly",
                                                 log_tail=tail, ended=time.time()))
        append_event(run_dir, "failed", error="the training process died unexpectedly", log_tail=tail)
    return info


def _kill_group(pgid: int | None) -> None:
    if not pgid:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- creating, launching, stopping

def new_run_dir(name: str | None, model: str, method: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = name or f"{Path(model.rstrip('/')).name.replace('builtin:', '')}-{method}-{stamp}"
    base = workspace.safe_name(base, "run")
    path = workspace.runs_dir() / base
    i = 1
    while path.exists():
        i += 1
        path = workspace.runs_dir() / f"{base}-{i}"
    path.mkdir(parents=True)
    return path


def launch(run_dir: str | Path, resume: bool = False, env: dict | None = None,
           python_args: list[str] | None = None) -> subprocess.Popen:
    """Start the training child: own session/process group, stdout+stderr appended to train.log.
    (`python_args` replaces `-m core.train`; fault tests use it to wrap the real trainer.)"""
    run_dir = Path(run_dir)
    cmd = [sys.executable, *(python_args or ["-m", "core.train"]), str(run_dir)] + (["--resume"] if resume else [])
    launcher = None
    gpus = _configured_gpus(run_dir)
    if gpus > 1 and python_args is None:
        # N ranks through `accelerate launch` (generated RUN_DIR/accelerate.yaml); the recorded pid
        # is the launcher's, which forwards SIGTERM to every rank (core/distributed.py)
        from . import config as config_lib
        from . import distributed

        try:
            cmd = distributed.launch_command(config_lib.load(run_dir / "config.yaml"), run_dir, resume)
            launcher = "accelerate"
        except config_lib.ConfigError:
            gpus = 1  # a bad config: the plain child reports it in run.json, as for any run
    child_env = _child_env(env)
    with open(run_dir / "train.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=child_env, cwd=str(run_dir))
    write_json(run_dir, status="starting", pid=proc.pid, pgid=proc.pid,
               pid_start_time=process_start_time(proc.pid), launched=time.time(), launcher=launcher, gpus=gpus)
    return proc


def _configured_gpus(run_dir: Path) -> int:
    """training.gpus from RUN_DIR/config.yaml (1 when absent or unreadable: the child reports it)."""
    import yaml

    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        return int((data.get("training") or {}).get("gpus") or 1)
    except (OSError, yaml.YAMLError, TypeError, ValueError, AttributeError):
        return 1


def _child_env(env: dict | None = None) -> dict:
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    # make sure the child imports this very package even when run from elsewhere
    pkg_root = str(Path(__file__).resolve().parents[1])
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in [pkg_root, child_env.get("PYTHONPATH", "")] if p)
    return child_env


def spawn(cmd: list[str], log_path: str | Path, cwd: str | Path | None = None,
          env: dict | None = None) -> subprocess.Popen:
    """Start any child job (convert, chat worker) like `launch` starts training: own session and
    process group, stdout+stderr appended to `log_path`, no pipe for anyone to drain."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=_child_env(env),
                                cwd=str(cwd) if cwd else None)


def stop(run_dir: str | Path, grace: float = 30.0) -> str:
    """SIGTERM the run's process group (the child saves at the next step and exits 3); after
    `grace` seconds SIGKILL the whole group. Returns the final status."""
    run_dir = Path(run_dir)
    info = status(run_dir)
    if info.get("status") not in ACTIVE:
        return info.get("status", "unknown")
    pgid = info.get("pgid") or info.get("pid")
    write_json(run_dir, stop_requested=time.time())
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return status(run_dir).get("status", "unknown")
    deadline = time.time() + grace
    while time.time() < deadline:
        if not is_alive(info):
            break
        time.sleep(0.2)
    else:
        _kill_group(pgid)
        time.sleep(0.5)
        write_json(run_dir, status="stopped", error=f"killed after a {grace:.0f}s grace period", ended=time.time())
    # reap any remaining members of the group (grandchildren)
    _kill_group(pgid)
    # the child records its end before it exits; ranks of a multi-GPU run exit before their
    # launcher. Give a last write a moment before a still-active run.json reads as a crash.
    end = time.time() + 5
    while read_json(run_dir).get("status") in ACTIVE and time.time() < end:
        time.sleep(0.1)
    return status(run_dir).get("status", "unknown")


def list_runs() -> list[dict]:
    out = []
    for d in sorted(workspace.runs_dir().iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
        if (d / "run.json").exists():
            info = status(d)
            info["run_dir"] = str(d)
            out.append(info)
    return out


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest *complete* checkpoint: the Trainer writes trainer_state.json last, so a save
    cut short (disk full, kill -9) is never resumed from."""
    cps = [p for p in Path(run_dir).glob("checkpoint-*")
           if p.is_dir() and p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()]
    return max(cps, key=lambda p: int(p.name.split("-")[-1])) if cps else None
