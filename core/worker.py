"""The web app's worker: core.analysis (tokenizers, chat templates, data files) in a child process,
so that nothing a page sends can take the server down.

    call("dataset_stats", timeout=..., **kwargs)  -> the function's result, or WorkerError

A template that renders forever, a file that fills the memory, a tokenizer that crashes: the
worker has an address-space limit (core.machine.limit_memory, "worker") and each request a time
limit; past either, the worker is killed (its whole process group) and the next request starts a
new one. The server answers with a sentence naming the limit, within the time limit, and every
other request meanwhile goes to the other worker of the pool.

Child: `python -m lorastudio.core.worker --ready FILE --parent-pid PID` (authkey in $LORASTUDIO_WORKER_AUTHKEY),
serving ("call", name, kwargs) -> ("ok", result) | ("error", message) over
multiprocessing.connection on 127.0.0.1; it exits when its parent or its client goes away.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

POOL_SIZE = 2  # a slow request (stats of a big file) never holds up a template render
# seconds a request may take. Loading a tokenizer (files only, no template) gets its own request
# and a long limit; what runs a template or parses data gets a short one, which
# LORASTUDIO_WORKER_TIMEOUT_S may lower further (tests)
TIMEOUTS = {"warm": 300, "load_tokenizer": 300, "dataset_stats": 600, "rows_page": 120, "render_template": 60,
            "own_template_source": 60, "preview": 120}
UNCAPPED = ("warm", "load_tokenizer")
START_TIMEOUT = 300


class WorkerError(ValueError):
    """A request the worker could not answer: its own error message, or a limit that was hit."""


def timeout_for(name: str) -> float:
    cap = os.environ.get("LORASTUDIO_WORKER_TIMEOUT_S")
    limit = TIMEOUTS.get(name, 120)
    return min(limit, float(cap)) if cap and name not in UNCAPPED else limit


# ---------------------------------------------------------------- the parent's side

class Worker:
    def __init__(self):
        from multiprocessing.connection import Client

        from . import machine, runs, workspace

        folder = workspace.home() / "workers"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
        self.log_path, ready = folder / f"{stem}.log", folder / f"{stem}.ready.json"
        authkey = secrets.token_bytes(32)
        self.limit = machine.memory_limit("worker")
        cmd = [sys.executable, "-m", "lorastudio.core.worker", "--ready", str(ready), "--parent-pid", str(os.getpid())]
        # the key goes through the environment, not argv (which any local user can read); no GPU
        self.proc = runs.spawn(cmd, self.log_path, env={"LORASTUDIO_WORKER_AUTHKEY": authkey.hex(),
                                                        "CUDA_VISIBLE_DEVICES": ""})
        deadline = time.time() + START_TIMEOUT
        try:
            while not ready.exists():
                if self.proc.poll() is not None:
                    raise WorkerError(f"the worker exited while starting ({self.proc.returncode}): {self._tail()}")
                if time.time() > deadline:
                    raise WorkerError(f"the worker did not start within {START_TIMEOUT}s")
                time.sleep(0.05)
            hello = json.loads(ready.read_text())
            ready.unlink(missing_ok=True)
            self.conn = Client(("127.0.0.1", hello["port"]), authkey=authkey)
        except BaseException:
            self.kill()
            raise

    def _tail(self, n: int = 3) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return ""

    def request(self, name: str, kwargs: dict, timeout: float):
        """The result, or WorkerError. Past the timeout, or when the worker dies, it is killed and
        must not be reused (self.dead)."""
        try:
            self.conn.send(("call", name, kwargs))
            deadline = time.time() + timeout
            while not self.conn.poll(0.05):
                if self.proc.poll() is not None:
                    raise WorkerError(self._died())
                if time.time() > deadline:
                    self.kill()
                    raise WorkerError(f"stopped after {timeout:.0f} s, the time limit for this request "
                                      f"({name.replace('_', ' ')}); nothing else was affected")
            kind, value = self.conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            self.proc.wait(5) if self.proc.poll() is None else None
            raise WorkerError(self._died()) from None
        if kind == "memory":  # the child exits after a MemoryError: a fresh one serves the next request
            self.kill()
        if kind in ("error", "memory"):
            raise WorkerError(value)
        return value

    def _died(self) -> str:
        self.kill()
        code = self.proc.returncode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit {code}"
        return (f"the request stopped: the worker process died ({how}; out of memory? its limit is "
                f"{self.limit / 2**30:.1f} GiB); nothing else was affected")

    @property
    def dead(self) -> bool:
        return self.proc.poll() is not None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.wait(10)
        with contextlib.suppress(Exception):
            self.conn.close()


_idle: list[Worker] = []
_count = 0
_cond = threading.Condition()


def _take() -> Worker:
    global _count
    with _cond:
        while True:
            while _idle and _idle[-1].dead:  # died while idle (its parent check, a kill)
                _idle.pop()
                _count -= 1
            if _idle or _count < POOL_SIZE:
                break
            _cond.wait()
        if _idle:
            return _idle.pop()  # the most recently used: its caches are warm
        _count += 1
    try:
        return Worker()
    except BaseException:
        with _cond:
            _count -= 1
            _cond.notify()
        raise


def _give_back(worker: Worker) -> None:
    global _count
    with _cond:
        if worker.dead:
            _count -= 1
        else:
            _idle.append(worker)
        _cond.notify()


def call(name: str, timeout: float | None = None, tokenizer: tuple[str, bool] | None = None, **kwargs):
    """Run core.analysis.FUNCTIONS[name](**kwargs) in a worker; WorkerError with a readable
    sentence when it fails or hits a limit. TOKENIZER=(model, trust): load that tokenizer first on
    the same worker, under the long limit, so the request's own limit counts only its own work."""
    worker = _take()
    try:
        if tokenizer is not None:
            worker.request("load_tokenizer", {"model": tokenizer[0], "trust": tokenizer[1]},
                           timeout_for("load_tokenizer"))
        return worker.request(name, kwargs, timeout or timeout_for(name))
    finally:
        _give_back(worker)


def warm_up() -> None:
    """Start a worker and load the default tokenizer in the background (the first preview is fast)."""
    def run():
        with contextlib.suppress(Exception):
            call("warm")

    threading.Thread(target=run, daemon=True, name="worker-warm-up").start()


# ---------------------------------------------------------------- the child

def _watch_parent(pid: int) -> None:
    import psutil

    while psutil.pid_exists(pid):
        time.sleep(1)
    os._exit(0)


def _answer(name: str, kwargs: dict):
    from . import analysis

    fn = analysis.FUNCTIONS.get(name)
    if fn is None:
        return "error", f"unknown request {name!r}"
    try:
        return "ok", fn(**kwargs)
    except MemoryError:
        return "memory", "the request stopped: the worker ran out of memory (its limit is " \
                         f"{_limit / 2**30:.1f} GiB); nothing else was affected"
    except RecursionError:
        return "error", "the request nested too deeply (a file or template with too many levels)"
    except Exception as e:  # noqa: BLE001 - one readable line for the page
        msg = str(e).strip() or type(e).__name__
        return "error", msg if isinstance(e, ValueError) else f"{type(e).__name__}: {msg}"


_limit = 0


def main(argv: list[str] | None = None) -> int:
    global _limit
    from multiprocessing.connection import Listener

    from . import machine

    ap = argparse.ArgumentParser(prog="python -m lorastudio.core.worker")
    ap.add_argument("--ready", required=True)
    ap.add_argument("--parent-pid", type=int)
    a = ap.parse_args(argv)
    from .child import quiet_libraries

    quiet_libraries()  # before tokenizers and datasets are imported
    _limit = machine.limit_memory("worker")
    if a.parent_pid:
        threading.Thread(target=_watch_parent, args=(a.parent_pid,), daemon=True).start()
    authkey = bytes.fromhex(os.environ.pop("LORASTUDIO_WORKER_AUTHKEY"))
    listener = Listener(("127.0.0.1", 0), authkey=authkey)
    ready = Path(a.ready)
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": listener.address[1], "pid": os.getpid()}))
    os.replace(tmp, ready)
    try:
        conn = listener.accept()
    except Exception:  # noqa: BLE001 - a client with the wrong key
        return 1
    listener.close()  # one client per worker
    while True:
        try:
            _kind, name, kwargs = conn.recv()
        except (EOFError, OSError, ValueError, TypeError):
            return 0
        kind, value = _answer(name, kwargs)
        try:
            conn.send((kind, value))
        except (OSError, ValueError):
            return 0
        if kind == "memory":
            return 3  # after a MemoryError the next request gets a fresh process


if __name__ == "__main__":
    sys.exit(main())
