"""Commands about training runs: train (follow its log), estimate, resume, runs, stop, retry."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from lorastudio import presets
from lorastudio.core import resolve

from . import estimate_text
from .common import echo_from, err, scale_sets


def cmd_train(a) -> int:
    from lorastudio.core import config as config_lib
    from lorastudio.core import runs

    cfg_path = presets.resolve(a.config)
    try:
        cfg = config_lib.load(cfg_path, a.set + scale_sets(a))
        machine = resolve.probe(cfg.training.device)  # once: create_run resolves for it below
        cfg = resolve.resolve(cfg, machine)
    except config_lib.ConfigError as e:
        return err(str(e), runs.EXIT_CONFIG)
    if a.gpu_mem is not None:  # pre-flight: the estimate before Start (it never blocks the run)
        from lorastudio.core import estimate as estimate_lib

        try:
            est = estimate_lib.estimate(cfg, gpu_mem_gib=estimate_lib.parse_gpu_mem(a.gpu_mem) if a.gpu_mem else None)
            print(estimate_text.format_text(est), flush=True)
        except (estimate_lib.EstimateError, ValueError) as e:
            print(f"estimate unavailable: {e}", file=sys.stderr)
    try:
        run_dir = runs.create_run(cfg, source=str(cfg_path), notes=(f"resolved from {cfg_path}",),
                                  run_dir=a.run_dir, machine=machine, start=False)
    except runs.LaunchError as e:
        return err(str(e))
    except config_lib.ConfigError as e:
        return err(str(e), runs.EXIT_CONFIG)
    proc = runs.launch(run_dir)
    print(f"run dir: {run_dir}", flush=True)
    if a.detach:
        return 0
    return _follow(run_dir, proc)


def cmd_estimate(a) -> int:
    """Peak VRAM by component, fits / does not fit, suggestions and time, before any download."""
    from lorastudio.core import config as config_lib
    from lorastudio.core import estimate as estimate_lib

    cfg_path = presets.resolve(a.config)
    try:
        cfg = config_lib.load(cfg_path, a.set)
        gpu = estimate_lib.parse_gpu_mem(a.gpu_mem)
        est = estimate_lib.estimate(cfg, gpu_mem_gib=gpu, dataset_tokens=a.dataset_tokens)
    except (config_lib.ConfigError, estimate_lib.EstimateError, ValueError) as e:
        return err(str(e))
    if a.json:
        print(json.dumps(est, indent=1, default=str))
    else:
        print(estimate_text.format_text(est))
    return 0 if est["fits"] is not False else 1


def cmd_resume(a) -> int:
    from lorastudio.core import runs

    run_dir = Path(a.run_dir).resolve()
    info = runs.status(run_dir)
    if not info:
        return err(f"{run_dir} is not a run directory (no run.json)")
    if info.get("status") in runs.ACTIVE:
        return err(f"{run_dir} is still {info['status']} (pid {info.get('pid')}); stop it first")
    if scale_sets(a):  # resume on another number of processes/strategy: rewrite config.yaml
        from lorastudio.core import config as config_lib

        path = run_dir / "config.yaml"
        try:
            cfg = resolve.resolve(config_lib.load(path, scale_sets(a)))
        except config_lib.ConfigError as e:
            return err(str(e), runs.EXIT_CONFIG)
        header = "\n".join(ln for ln in path.read_text().splitlines() if ln.startswith("#"))
        config_lib.save(cfg, path, header=header + "\n" if header else "")
    try:
        proc = runs.launch(run_dir, resume=True)
    except runs.LaunchError as e:
        return err(str(e))
    print(f"resuming {run_dir}", flush=True)
    if a.detach:
        return 0
    return _follow(run_dir, proc)


def _follow(run_dir: Path, proc) -> int:
    """Echo train.log while the child runs; Ctrl-C stops the run cleanly (SIGTERM, grace, SIGKILL)."""
    from lorastudio.core import runs

    log = run_dir / "train.log"
    pos = 0
    interrupted = False

    def on_int(signum, frame):
        nonlocal interrupted
        interrupted = True

    old = signal.signal(signal.SIGINT, on_int)
    try:
        while True:
            pos = echo_from(log, pos)
            if interrupted:
                print("\nstopping (saving at the next step)...", flush=True)
                runs.stop(run_dir, grace=60)
                interrupted = False
            code = proc.poll()
            if code is not None:
                echo_from(log, pos)  # the last lines written before it exited
                info = runs.read_json(run_dir)
                if info.get("launcher") and info.get("exit_code") is not None:
                    code = info["exit_code"]  # accelerate launch exits 1 for any rank's non-zero exit
                if code != 0 and info.get("error"):
                    print(f"error: {info['error']}", file=sys.stderr)
                return code
            time.sleep(0.3)
    finally:
        signal.signal(signal.SIGINT, old)


def cmd_runs(a) -> int:
    from lorastudio.core import runs

    items = runs.list_runs()
    if a.json:
        print(json.dumps(items, indent=2, default=str))
        return 0
    if not items:
        print("no runs yet (lorastudio train presets/tiny_demo.yaml)")
        return 0
    print(f"{'STATUS':<9} {'STEP':>10} {'LOSS':>8}  RUN")
    from lorastudio.core.history import _number

    for info in items:
        events, _ = runs.read_events(info["run_dir"])
        steps = [e for e in events if e.get("event") == "step"]
        last = steps[-1] if steps else {}
        total = _number(last.get("total_steps"))
        step = f"{int(_number(last.get('step')) or 0)}/{int(total) if total else '?'}" if last else "-"
        loss = f"{_number(last.get('loss')):.4f}" if _number(last.get("loss")) is not None else "-"
        print(f"{info.get('status', '?'):<9} {step:>10} {loss:>8}  {info['run_dir']}")
        if info.get("status") == "failed" and info.get("error"):
            print(f"          error: {info['error']}")
        if info.get("status") == "queued" and info.get("queue_position"):
            print(f"          queued: position {info['queue_position']} for {info.get('queue_device')} "
                  f"(held by {info.get('queue_holder')})")
    return 0


def cmd_stop(a) -> int:
    from lorastudio.core import runs
    from lorastudio.core import jobs

    run_dir = Path(a.run_dir).resolve()
    if not (run_dir / "run.json").exists():
        return err(f"{run_dir} is not a run directory (no run.json)")
    if jobs.record(run_dir) is None:
        return err(f"{run_dir}: no process of it was started by LoRA Studio here ($LORASTUDIO_HOME/jobs has no "
                    "record of it): nothing to stop", 1)
    print(runs.stop(run_dir, grace=a.grace))
    return 0


def cmd_retry(a) -> int:
    """Start a new run from a failed one with the suggested change (after OOM: half the
    micro-batch, double the accumulation, same effective batch)."""
    from lorastudio.core import config as config_lib
    from lorastudio.core import recovery

    run_dir = Path(a.run_dir).resolve()
    if not (run_dir / "config.yaml").exists():
        return err(f"{run_dir} is not a run directory (no config.yaml)")
    from lorastudio.core import runs

    try:
        new_dir = recovery.retry(run_dir, launch=False)
    except (config_lib.ConfigError, runs.LaunchError) as e:
        return err(str(e))

    proc = runs.launch(new_dir)
    print(f"run dir: {new_dir}", flush=True)
    return 0 if a.detach else _follow(new_dir, proc)
