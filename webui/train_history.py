"""The Train tab's run history as data: the table of runs, loss curves overlaid, the config diff
of two runs, deleting a finished run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lorastudio.core import history

from .helpers import err_md, workspace_run
from .train_view import OVERLAY, frame


def history_frame() -> pd.DataFrame:
    rows = history.list_history()
    cols = ["run", "status", "method", "step", "total_steps", "loss", "best_eval_loss", "best_checkpoint", "disk_mb",
            "run_dir"]
    return pd.DataFrame([{k: r.get(k) for k in cols} for r in rows], columns=cols)


def overlay_frame(run_dirs_: list[str]) -> pd.DataFrame:
    rows = []
    for d in (run_dirs_ or [])[:50]:
        d = workspace_run(d)
        for s, y in history.curves(d)["loss"]:
            rows.append({"step": s, "loss": y, "run": Path(d).name})
    return frame(rows, OVERLAY)


def diff_frame(a: str, b: str) -> pd.DataFrame:
    if not a or not b:
        return pd.DataFrame(columns=["key", "a", "b"])
    a, b = workspace_run(a), workspace_run(b)
    rows = history.config_diff(a, b)
    return pd.DataFrame([{"key": r["key"], "a": str(r["a"]), "b": str(r["b"])} for r in rows],
                        columns=["key", "a", "b"])


def delete(run_dir: str) -> str:
    try:
        history.delete_run(workspace_run(run_dir))
    except Exception as e:  # noqa: BLE001
        return err_md(e)
    return f"deleted {Path(run_dir).name}"
