"""The run directory contract, shared by the trainer child, the CLI, the web UI and tests.

    RUN_DIR/config.yaml     every resolved value (`lorastudio train RUN_DIR/config.yaml` reruns it)
    RUN_DIR/run.json        status, pid + process start time, versions, dataset hash, exit code
    RUN_DIR/metrics.jsonl   append-only events: start, step, eval, sample, checkpoint, end/failed
    RUN_DIR/train.log       the child's stdout + stderr (never a pipe nobody drains)
    RUN_DIR/adapter/        the trained adapter (PEFT folder), or model/ for full fine-tuning
    RUN_DIR/checkpoint-N/   Trainer checkpoints (last K kept), what `resume` continues from

A child runs in its own process group so Stop can signal the whole tree. A run directory may be
anybody's files: reading one writes and signals nothing, and Stop signals only a process that
core.jobs recorded at launch (pid, start time and command line); a dead child (or a reused pid,
or a pid someone wrote into run.json) reads as failed.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil

from . import jobs, machine, safe_io, workspace

EXIT_DONE, EXIT_FAILED, EXIT_CONFIG, EXIT_STOPPED = 0, 1, 2, 3
ACTIVE = ("queued", "starting", "running", "stopping")


# ---------------------------------------------------------------- run.json and metrics.jsonl

MAX_RUN_JSON = 4 * 2**20
MAX_EVENT_LINE = 1 << 20  # a metrics.jsonl line longer than this is skipped, never parsed
MAX_EVENTS_READ = 256 * 2**20  # metrics.jsonl read per call (the UI tails it incrementally)


def read_json(run_dir: str | Path) -> dict:
    """run.json as a dict; {} when it is missing, not a regular file, too big or not a JSON object
    (a run directory may be anybody's: nothing read here is trusted, see core.jobs)."""
    try:
        data = safe_io.read_json(Path(run_dir) / "run.json", MAX_RUN_JSON)
    except safe_io.FileProblem:
        return {}
    if not isinstance(data, dict):
        return {}
    if not isinstance(data.get("status", ""), str):
        data["status"] = "?"
    return data


def _json_lock(run_dir: str | Path):
    """run.json has several writers (the child or rank 0, Stop, Stop marking a dead run failed,
    the queue): each read-modify-write holds this lock, or one could undo another's
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
    """Events from byte `offset` on, and the new offset (for incremental tailing by the UI). Lines
    that are not JSON objects, or longer than MAX_EVENT_LINE, are skipped; at most MAX_EVENTS_READ
    bytes are read per call (the next call goes on from the offset returned)."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return [], offset
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return [], offset
        f.seek(offset)
        data = f.read(MAX_EVENTS_READ)
    end = data.rfind(b"\n") + 1  # ignore a line still being written
    if end == 0 and len(data) >= MAX_EVENTS_READ:
        end = len(data)  # one enormous line: skip past it
    events = []
    for line in data[:end].splitlines():
        if len(line) > MAX_EVENT_LINE:
            continue
        try:
            e = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(e, dict) and isinstance(e.get("event"), str):
            events.append(e)
    return events, offset + end


def log_tail(run_dir: str | Path, n: int = 20) -> list[str]:
    data = safe_io.tail_bytes(Path(run_dir) / "train.log", 64 * 1024)
    return [ln[:2000] for ln in data.decode("utf-8", "replace").splitlines()[-n:]]


# ---------------------------------------------------------------- liveness

def process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, TypeError):
        return None


def is_alive(run_dir: str | Path) -> bool:
    """A process this app launched for RUN_DIR still runs (core.jobs: pid, start time and command
    line as recorded at launch; run.json's pid is never trusted)."""
    return jobs.live(run_dir) is not None


DIED = "the training process died unexpectedly"


def status(run_dir: str | Path) -> dict:
    """run.json, as it stands now: an active run whose process is gone reads as failed. A read:
    it writes nothing and signals nothing (stop() and the child do that)."""
    run_dir = Path(run_dir)
    info = read_json(run_dir)
    if info.get("status") in ACTIVE and info.get("pid") and not is_alive(run_dir):
        info = read_json(run_dir)  # again: the child may have just written its end
        if info.get("status") in ACTIVE and not is_alive(run_dir):
            info.update(status="failed", error=info.get("error") or DIED, log_tail=log_tail(run_dir, 10))
    return info


def in_workspace(run_dir: str | Path) -> bool:
    """A run directory of this workspace's runs/ folder (what the web app may act on)."""
    p = Path(run_dir).resolve()
    return p.parent == workspace.runs_dir()


# ---------------------------------------------------------------- creating, launching, stopping

class LaunchError(ValueError):
    """A run that cannot start now (it is already running)."""


def new_run_dir(name: str | None, model: str, method: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = name or f"{Path(model.rstrip('/')).name.replace('builtin:', '')}-{method}-{stamp}"
    base = workspace.safe_name(base, "run")
    for i in range(1, 10_000):
        path = workspace.runs_dir() / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()  # not exist_ok: two Starts at once never share a folder
            return path
        except FileExistsError:
            continue
    raise LaunchError(f"too many runs named {base}")


def create_run(cfg, *, source: str, notes: tuple[str, ...] = (), run_dir: str | Path | None = None,
               machine=None, start: bool = True, **record) -> Path:
    """The one way a run comes to be (`lorastudio train`, the web app's Start, retry): resolve cfg
    for the machine the child will run on (core.resolve; probed in a child process when this one
    has no torch), make the run directory (a new one in the workspace unless RUN_DIR is given),
    write config.yaml once with every resolved value, run.json (queued, its source), then start
    the training child. The memory settings of a CUDA run stay `auto` here: the child decides them
    from its data and records them in run.json (memory_plan)."""
    from . import config as config_lib
    from . import resolve

    cfg = resolve.resolve(cfg, machine or resolve.probe_here_or_in_child(cfg.training.device))
    if run_dir is None:
        run_dir = new_run_dir(cfg.output.run_name, cfg.model.name_or_path, cfg.method)
    else:
        run_dir = Path(run_dir).resolve()
        if (run_dir / "run.json").exists():
            raise LaunchError(f"{run_dir} already holds a run; use `lorastudio resume {run_dir}` or another folder")
        run_dir.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {line}\n" for line in (f"lorastudio train {run_dir / 'config.yaml'}", *notes))
    config_lib.save(cfg, run_dir / "config.yaml", header=header)
    write_json(run_dir, status="queued", created=time.time(), source_config=source, run_name=run_dir.name, **record)
    if start:
        launch(run_dir)
    return run_dir


def launch(run_dir: str | Path, resume: bool = False, env: dict | None = None,
           python_args: list[str] | None = None) -> subprocess.Popen:
    """Start the training child: own session/process group, stdout+stderr appended to train.log,
    recorded in core.jobs (the only record Stop trusts). A run already running is refused.
    (`python_args` replaces `-m lorastudio.core.train`; fault tests use it to wrap the real trainer.)"""
    from filelock import FileLock

    run_dir = Path(run_dir).resolve()
    with FileLock(str(run_dir / ".launch.lock"), timeout=60):  # two Resumes at once: one starts
        running = jobs.live(run_dir)
        if running is not None and read_json(run_dir).get("status") not in ACTIVE:
            try:  # it has recorded its end and is exiting: give it a moment
                running.wait(30)
            except psutil.Error:
                pass
        if jobs.live(run_dir):
            raise LaunchError(f"{run_dir.name} is already running; stop it first")
        cmd = [sys.executable, *(python_args or ["-m", "lorastudio.core.train"]), str(run_dir)] + (["--resume"] if resume else [])
        launcher, gpus = None, _configured_gpus(run_dir)
        if gpus > 1 and python_args is None and machine.gpus_problem(gpus, _configured_device(run_dir)) is None:
            # N ranks through `accelerate launch` (generated RUN_DIR/accelerate.yaml); the recorded pid
            # is the launcher's, which forwards SIGTERM to every rank (core/distributed.py)
            from . import config as config_lib
            from . import distributed

            try:
                cmd = distributed.launch_command(config_lib.load(run_dir / "config.yaml"), run_dir, resume)
                launcher = "accelerate"
            except config_lib.ConfigError:
                pass
        # otherwise one plain child: a bad config, or more processes than the machine has GPUs (or
        # than a CPU test allows), is refused by the child with its message in run.json
        gpus = gpus if launcher else 1
        token = jobs.new_token()
        extra = {jobs.TOKEN_ENV: token}
        if launcher:
            # on SIGTERM the launcher forwards it to the ranks and waits for them: every rank saves
            # at the agreed step and rank 0 records the end before the launcher exits. torchrun's
            # own default (30 s, then SIGKILL) cut that short on a loaded machine; Stop's grace
            # period is the one limit (runs.stop SIGKILLs the job after it)
            extra["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(24 * 3600)
        child_env = _child_env({**(env or {}), **extra})
        with open(run_dir / "train.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=child_env, cwd=str(run_dir))
        jobs.register(run_dir, proc.pid, token, cmdline=cmd)
        write_json(run_dir, status="starting", pid=proc.pid, pgid=proc.pid,
                   pid_start_time=process_start_time(proc.pid), launched=time.time(), launcher=launcher, gpus=gpus)
    return proc


def _config_dict(run_dir: Path) -> dict:
    try:
        data = safe_io.read_yaml(run_dir / "config.yaml")
    except safe_io.FileProblem:
        return {}
    return data if isinstance(data, dict) else {}


def _configured_gpus(run_dir: Path) -> int:
    """training.gpus from RUN_DIR/config.yaml (1 when absent or unreadable: the child reports it)."""
    try:
        return max(1, int((_config_dict(run_dir).get("training") or {}).get("gpus") or 1))
    except (TypeError, ValueError, AttributeError, OverflowError):
        return 1


def _configured_device(run_dir: Path) -> str:
    try:
        return str((_config_dict(run_dir).get("training") or {}).get("device") or "auto")
    except AttributeError:
        return "auto"


def _child_env(env: dict | None = None) -> dict:
    return {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}


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
    `grace` seconds SIGKILL it; then every process carrying the job's token (ranks, grandchildren,
    a rank still starting). Only a job core.jobs recorded is ever signalled: a run.json naming
    some other process is a claim, not a target. Returns the final status."""
    run_dir = Path(run_dir).resolve()
    rec = jobs.record(run_dir)
    if rec is None:  # never launched by this app (or launched elsewhere): nothing to signal here
        return status(run_dir).get("status", "unknown")
    if jobs.live(run_dir, rec) is None:
        jobs.kill_members(rec, within=2)  # stragglers of a job whose main process is gone
        _record_death(run_dir)
        return status(run_dir).get("status", "unknown")
    write_json(run_dir, stop_requested=time.time())
    jobs.signal_group(rec, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and jobs.live(run_dir, rec) is not None:
        time.sleep(0.2)
    killed = jobs.live(run_dir, rec) is not None
    if killed:
        jobs.signal_group(rec, signal.SIGKILL)
    jobs.kill_members(rec)
    if killed:
        write_json(run_dir, status="stopped", error=f"killed after a {grace:.0f}s grace period", ended=time.time())
    # the child records its end before it exits; ranks of a multi-GPU run exit before their
    # launcher. Give a last write a moment before a still-active run.json reads as a crash.
    end = time.time() + 5
    while read_json(run_dir).get("status") in ACTIVE and time.time() < end:
        time.sleep(0.1)
    # signalled before it could record anything (a child still starting): it was stopped, not a crash
    _record_death(run_dir, "stopped", "stopped before the run had started")
    return status(run_dir).get("status", "unknown")


def _record_death(run_dir: Path, how: str = "failed", why: str = DIED) -> None:
    """A job of ours is gone while run.json still says it runs: write that down (once)."""
    if not (run_dir / "run.json").exists():  # deleted meanwhile (once it had ended)
        return
    with _json_lock(run_dir):
        info = read_json(run_dir)
        if info.get("status") not in ACTIVE or is_alive(run_dir):
            return
        tail = log_tail(run_dir, 10)
        _write_unlocked(run_dir, dict(status=how, error=why, log_tail=tail, ended=time.time()))
    append_event(run_dir, how, error=why, log_tail=tail)


def list_runs() -> list[dict]:
    """status() of every run directory in the workspace, newest first (unreadable ones skipped)."""
    found = []
    for d in workspace.runs_dir().iterdir():
        try:
            if d.is_dir() and not d.is_symlink() and safe_io.is_regular(d / "run.json"):
                found.append((d.stat().st_mtime, d))
        except OSError:
            continue
    out = []
    for _mtime, d in sorted(found, key=lambda x: x[0], reverse=True):
        info = status(d)
        info["run_dir"] = str(d)
        out.append(info)
    return out


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    complete: bool  # trainer_state.json written (the Trainer writes it last): a resume point
    adapter: bool  # adapter_config.json: exportable, mergeable, chat-able


def checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """The checkpoint-N folders of a run as they are on disk now, ascending by step: the one
    listing every tab, command and the trainer use (save_total_limit deletes old ones while a run
    trains, so callers re-read it instead of keeping it)."""
    out = []
    for p in Path(run_dir).glob("checkpoint-*"):
        tail = p.name.rpartition("-")[2]
        if tail.isdigit() and p.is_dir() and not p.is_symlink():
            out.append(Checkpoint(int(tail), p, (p / "trainer_state.json").is_file(),
                                  (p / "adapter_config.json").is_file()))
    return sorted(out, key=lambda c: c.step)


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest *complete* checkpoint: a save cut short (disk full, kill -9) is never resumed from."""
    complete = [c for c in checkpoints(run_dir) if c.complete]
    return complete[-1].path if complete else None
