"""Run history: pure functions over run directories (no gradio, no torch).

    summarize(run_dir)        one row per run: status, step, last loss, best eval loss, disk use
    curves(run_dir)           loss / eval_loss / lr points from metrics.jsonl
    best_checkpoint(run_dir)  the saved checkpoint with the lowest eval loss (None without evals)
    config_diff(a, b)         flattened config.yaml keys whose values differ
    disk_usage(path)          bytes under a folder
    delete_run(run_dir)       remove a finished run directory (refuses active runs and non-runs)
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from . import runs, safe_io, workspace


def disk_usage(path: str | Path) -> int:
    total = 0
    for p in Path(path).rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            continue
    return total


def curves(run_dir: str | Path, events: list[dict] | None = None) -> dict[str, list[tuple[int, float]]]:
    """{"loss": [(step, v)], "eval_loss": [...], "lr": [...]} from the run's events."""
    if events is None:
        events, _ = runs.read_events(run_dir)
    out: dict[str, list[tuple[int, float]]] = {"loss": [], "eval_loss": [], "lr": []}
    for e in events:
        step = _number(e.get("step"))
        if step is None:
            continue  # metrics.jsonl is anybody's file: a point without a numeric step is skipped
        if e.get("event") == "step" and _number(e.get("loss")) is not None:
            out["loss"].append((int(step), _number(e["loss"])))
            if _number(e.get("lr")) is not None:
                out["lr"].append((int(step), _number(e["lr"])))
        elif e.get("event") == "eval" and _number(e.get("eval_loss")) is not None:
            out["eval_loss"].append((int(step), _number(e["eval_loss"])))
    return out


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def best_checkpoint(run_dir: str | Path, events: list[dict] | None = None) -> dict | None:
    """{"step", "eval_loss", "path"} of the existing checkpoint with the lowest eval loss at its
    step; None when no existing checkpoint has an eval at its step."""
    if events is None:
        events, _ = runs.read_events(run_dir)
    evals = {}
    for e in events:
        if e.get("event") == "eval" and _number(e.get("eval_loss")) is not None and _number(e.get("step")) is not None:
            evals[int(e["step"])] = _number(e["eval_loss"])  # a resumed run's later value wins
    scored = [(evals[c.step], c.step) for c in runs.checkpoints(run_dir) if c.step in evals]
    if not scored:
        return None
    loss, step = min(scored)
    return {"step": step, "eval_loss": loss, "path": str(Path(run_dir) / f"checkpoint-{step}")}


def summarize(run_dir: str | Path, info: dict | None = None) -> dict:
    run_dir = Path(run_dir)
    info = info if info is not None else runs.status(run_dir)
    events, _ = runs.read_events(run_dir)
    c = curves(run_dir, events)
    best = best_checkpoint(run_dir, events)
    last_step = next((e for e in reversed(events) if e.get("event") == "step"), {})
    cfg = load_config_dict(run_dir)
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    return {
        "run": run_dir.name,
        "run_dir": str(run_dir),
        "status": info.get("status", "?"),
        "model": str(model.get("name_or_path", "?"))[:200],
        "method": str(cfg.get("method", "?"))[:20],
        "step": int(_number(last_step.get("step")) or 0),
        "total_steps": _number(last_step.get("total_steps")),
        "loss": round(c["loss"][-1][1], 4) if c["loss"] else None,
        "best_eval_loss": round(min(v for _, v in c["eval_loss"]), 4) if c["eval_loss"] else None,
        "best_checkpoint": best["step"] if best else None,
        "disk_mb": round(disk_usage(run_dir) / 2**20, 2),
        "created": _number(info.get("created")),
    }


def list_history() -> list[dict]:
    """summarize() for every run in the workspace, newest first."""
    return [summarize(i["run_dir"], i) for i in runs.list_runs()]


def load_config_dict(run_dir: str | Path) -> dict:
    """RUN_DIR/config.yaml as a dict; {} when unreadable (core.safe_io: no FIFOs, no alias bombs)."""
    try:
        data = safe_io.read_yaml(Path(run_dir) / "config.yaml")
    except safe_io.FileProblem:
        return {}
    return data if isinstance(data, dict) else {}


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def config_diff(a: dict | str | Path, b: dict | str | Path, ignore: tuple[str, ...] = ("resolved.",)) -> list[dict]:
    """[{"key", "a", "b"}] for every flattened key whose value differs (run dirs or dicts)."""
    fa = _flatten(a if isinstance(a, dict) else load_config_dict(a))
    fb = _flatten(b if isinstance(b, dict) else load_config_dict(b))
    rows = []
    for key in sorted(set(fa) | set(fb)):
        if key.startswith(ignore):
            continue
        va, vb = fa.get(key), fb.get(key)
        if va != vb:
            rows.append({"key": key, "a": va, "b": vb})
    return rows


def delete_run(run_dir: str | Path) -> None:
    """Remove a run directory. Refuses active runs, folders outside the workspace's runs/ and
    folders that do not look like runs (no run.json); and a run some process is writing (training,
    a merge) at this moment: its writer lock is taken for the removal."""
    from . import locks

    run_dir = Path(run_dir).resolve()
    if not (run_dir / "run.json").exists():
        raise ValueError(f"{run_dir} is not a run directory (no run.json)")
    if workspace.runs_dir() not in run_dir.parents:
        raise ValueError(f"{run_dir} is outside the workspace runs folder; delete it by hand")
    info = runs.status(run_dir)
    if info.get("status") in runs.ACTIVE:
        raise ValueError(f"{run_dir.name} is still {info['status']}; stop it first")
    try:
        lock = locks.writer_lock(run_dir)
    except locks.Busy:
        raise ValueError(f"{run_dir.name} is in use (training, or a merge or export); try again when it ends") from None
    try:
        if runs.is_alive(run_dir):
            raise ValueError(f"{run_dir.name} is running; stop it first")
        trash = run_dir.with_name(f".deleting-{run_dir.name}")
        os.replace(run_dir, trash)  # one rename: nobody sees half a run
    finally:
        lock.release()
    shutil.rmtree(trash, ignore_errors=True)
    from . import jobs

    jobs.forget(run_dir)
