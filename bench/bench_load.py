"""Load benchmark: 5 concurrent clients previewing datasets and chatting while a tiny
training runs. Reports failed requests, p50/p95 handler latency, and the training step rate
against the same training running alone. Loopback only, bounded loops.

    OMP_NUM_THREADS=1 python bench/bench_load.py [--clients 5] [--requests 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("LORASTUDIO_HOME", tempfile.mkdtemp(prefix="lorastudio-load-"))
os.environ.setdefault("LORASTUDIO_ALLOW_DIRS", "/tmp")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from lorastudio.core import runs  # noqa: E402


def train(run_dir: Path, steps: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lorastudio.cli", "train", "presets/tiny_smoke.yaml", "--run-dir",
                             str(run_dir), "--detach", "--set", f"training.max_steps={steps}",
                             "--set", "training.sample_every=0", "--set", "data.eval_split=0",
                             "--set", "training.save_steps=100000"], cwd=ROOT)


def wait_done(run_dir: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if runs.status(run_dir).get("status") in ("done", "failed", "stopped"):
            return
        time.sleep(0.5)
    raise TimeoutError(run_dir)


def step_rate(run_dir: Path, t0: float | None = None, t1: float | None = None) -> float:
    """Optimizer steps per second over the steady part of the run (after step 5), or within [t0, t1]."""
    steps = [e for e in runs.read_events(run_dir)[0] if e["event"] == "step" and e["step"] > 5]
    if t0 is not None:
        steps = [e for e in steps if t0 <= e["time"] <= t1]
    if len(steps) < 2:
        return float("nan")
    return (steps[-1]["step"] - steps[0]["step"]) / (steps[-1]["time"] - steps[0]["time"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--requests", type=int, default=12, help="requests per client (bounded)")
    ap.add_argument("--steps", type=int, default=400)
    a = ap.parse_args()
    from gradio_client import Client
    from test_webui_handlers import TOKEN, start_app, stop_app

    work = Path(tempfile.mkdtemp(prefix="load-"))
    # 0. a trained run to chat with, and the step rate of a training running alone
    alone = work / "alone"
    train(alone, a.steps).wait()
    wait_done(alone)
    rate_alone = step_rate(alone)

    url, app = start_app(work / "app.log")
    latencies: dict[str, list[float]] = {"dataset_stats": [], "preview": [], "chat_once": []}
    failures: list[str] = []
    lock = threading.Lock()

    def client_loop(i: int) -> None:
        c = Client(url, verbose=False, headers={"Authorization": f"Bearer {TOKEN}"})
        for k in range(a.requests):
            kind = ("dataset_stats", "preview", "chat_once")[(i + k) % 3]
            t = time.perf_counter()
            try:
                if kind == "dataset_stats":
                    r = c.predict("builtin:tiny", "builtin:sample", "auto", "", "auto", "", 128, False,
                                  api_name="/dataset_stats")
                    ok = r.get("rows_used", 0) > 0
                elif kind == "preview":
                    pieces, md = c.predict("builtin:tiny", "builtin:sample", "auto", 2, api_name="/preview")
                    ok = bool(pieces) and "samples" in md
                else:
                    r = c.predict("What is your name?", str(alone), "final", "fine-tuned", "", 0.7, 0.9, 16, True,
                                  api_name="/chat_once")
                    ok = "reply" in r
                if not ok:
                    raise RuntimeError(f"bad answer: {str(r)[:200] if kind != 'preview' else md}")
            except Exception as e:  # noqa: BLE001 - counted, not raised
                with lock:
                    failures.append(f"{kind}: {e}")
                continue
            with lock:
                latencies[kind].append(time.perf_counter() - t)

    # 1. the same training, now with the clients hammering the app
    busy = work / "busy"
    train(busy, a.steps).wait()
    while not [e for e in runs.read_events(busy)[0] if e["event"] == "step" and e["step"] > 5]:
        time.sleep(0.2)
    t0 = time.time()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(a.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t1 = time.time()
    rate_busy = step_rate(busy, t0, t1)
    wait_done(busy)
    stop_app(app)

    total = sum(len(v) for v in latencies.values()) + len(failures)
    every = sorted(x for v in latencies.values() for x in v)
    p95 = lambda xs: sorted(xs)[max(0, int(round(0.95 * len(xs))) - 1)] if xs else float("nan")  # noqa: E731
    print(f"\n{a.clients} clients x {a.requests} requests ({total} in all) during training, {t1 - t0:.1f} s")
    print(f"{'handler':<15}{'n':>5}{'p50 s':>9}{'p95 s':>9}")
    for k, v in latencies.items():
        print(f"{k:<15}{len(v):>5}{statistics.median(v) if v else float('nan'):>9.2f}{p95(v):>9.2f}")
    print(f"{'all':<15}{len(every):>5}{statistics.median(every):>9.2f}{p95(every):>9.2f}")
    print(f"failed requests: {len(failures)}" + (f"  e.g. {failures[0]}" if failures else ""))
    print(f"training step rate: alone {rate_alone:.2f} steps/s, under load {rate_busy:.2f} steps/s "
          f"({rate_busy / rate_alone:.0%} of alone)")
    print(json.dumps({"failed": len(failures), "p95_s": p95(every), "rate_alone": rate_alone, "rate_busy": rate_busy}))


if __name__ == "__main__":
    main()
