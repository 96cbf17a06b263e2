"""The Train tab's live view as data: everything it shows for a run, read from the run directory
alone (run.json, metrics.jsonl, train.log), so a page reload or a server restart re-attaches with
the full curve. The tab's gr.Timer calls signature() every second and run_view() when it changed."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd

from lorastudio.core import history, runs

from .helpers import error_text, fmt_seconds, workspace_run


def _finite(x) -> float | None:
    """A number from metrics.jsonl or run.json (anybody's file), else None."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def run_view(run_dir: str) -> dict:
    """Everything the live view shows for RUN_DIR, read from the run directory alone."""
    if not (run_dir or "").strip():
        return {"run_dir": "", "status": "", "loss": [], "eval_loss": [], "lr": [], "samples": [],
                "log": [], "best": None, "rewards": {}}
    run_dir = workspace_run(run_dir)
    info = runs.status(run_dir)
    events, _ = runs.read_events(run_dir)
    c = history.curves(run_dir, events)
    last = next((e for e in reversed(events) if e.get("event") == "step"), {})
    start = next((e for e in reversed(events) if e.get("event") == "start"), {})
    data = next((e for e in reversed(events) if e.get("event") == "data"), {})
    samples = [{"step": _finite(e.get("step")), "prompt": str(e.get("prompt"))[:2000], "reply": str(e.get("reply"))[:4000]}
               for e in events if e.get("event") == "sample"][-200:]
    total = _finite(last.get("total_steps")) or _finite(start.get("total_steps"))
    warnings = info.get("warnings") if isinstance(info.get("warnings"), list) else []
    return {
        "run_dir": str(run_dir), "run": Path(run_dir).name, "status": info.get("status", "?"),
        "error": str(info["error"])[:4000] if info.get("error") else None,
        "step": int(_finite(last.get("step")) or 0), "total_steps": int(total) if total else None,
        "loss_last": _finite(last.get("loss")), "eta_s": _finite(last.get("eta_s")),
        "elapsed_s": _finite(last.get("elapsed_s")), "tokens_per_s": _finite(last.get("tokens_per_s")),
        "mem_mb": _finite(last.get("mem_mb")), "epoch": _finite(last.get("epoch")),
        "loss": c["loss"], "eval_loss": c["eval_loss"], "lr": c["lr"], "samples": samples,
        "rewards": rewards(events),
        "best": history.best_checkpoint(run_dir, events), "data": data if isinstance(data, dict) else {},
        "log": runs.log_tail(run_dir, 20), "cli": f"lorastudio train {Path(run_dir) / 'config.yaml'}",
        "retry": info.get("retry") if isinstance(info.get("retry"), dict) else None,
        "queue_position": _finite(info.get("queue_position")),
        "speed_path": info.get("speed_path") if isinstance(info.get("speed_path"), dict) else None,
        "warnings": [str(w)[:1000] for w in warnings[:10]],
    }


def status_markdown(v: dict) -> str:
    if not v.get("status"):
        return "No run yet: pick a preset (or fill the form) and press **Start**."
    parts = [f"**{v['run']}** · status **{v['status']}**"]
    if v.get("total_steps"):
        pct = 100 * v["step"] / v["total_steps"]
        parts.append(f"step {v['step']}/{v['total_steps']} ({pct:.0f}%)")
    if v.get("loss_last") is not None:
        parts.append(f"loss {v['loss_last']:.4f}")
    if v["eval_loss"]:
        parts.append(f"eval loss {v['eval_loss'][-1][1]:.4f}")
    if v["status"] in runs.ACTIVE and v.get("eta_s") is not None:
        parts.append(f"ETA {fmt_seconds(v['eta_s'])}")
    if v.get("tokens_per_s") is not None:
        parts.append(f"{v['tokens_per_s']:.0f} tok/s")
    if v.get("mem_mb") is not None:
        parts.append(f"memory {v['mem_mb']:.0f} MB")
    parts.append(f"{len(v['loss'])} loss points")
    md = " · ".join(parts)
    if v.get("best"):
        md += f"\n\n⭐ best checkpoint by eval loss: **checkpoint-{v['best']['step']}** ({v['best']['eval_loss']:.4f})"
    sp = v.get("speed_path")
    if sp:
        on = [name for key, name in (("padding_free", "padding-free"), ("packing", "packing"),
                                     ("gradient_checkpointing", "checkpointing"),
                                     ("offload_activations", "activations in CPU RAM"),
                                     ("embeddings_on_cpu", "embeddings in CPU RAM"), ("fp32_upcast", "fp32 upcast"),
                                     ("fused_lora", "fused LoRA layers"), ("tiled_mlp", "tiled MLP"),
                                     ("cudnn_attention", "cuDNN attention"))
              if sp.get(key) is True]
        if sp.get("gradient_checkpointing") is True and isinstance(sp.get("checkpoint_layers"), int):
            on[on.index("checkpointing")] = f"checkpointing ({sp['checkpoint_layers']} layers)"
        if (sp.get("pad_to_multiple_of") or 1) > 1:
            on.append(f"rows padded to ×{sp['pad_to_multiple_of']}")
        kernels = f"kernels {sp['kernels']}" if sp.get("kernels") not in (None, "off") else "no fused kernels"
        md += f"\n\nspeed path: {', '.join(on) or 'defaults'}; {kernels}; optimizer {sp.get('optimizer')}"
    if v.get("queue_position") and v["status"] == "queued":
        md += f"\n\nqueued: position {int(v['queue_position'])} (another run holds the device)"
    for w in v.get("warnings") or []:
        md += f"\n\n⚠️ {w}"
    if v.get("error"):
        md += f"\n\n**Error:** {v['error']}"
    if v.get("retry") and v["status"] == "failed":
        md += f"\n\n💡 **Retry** starts it again with {v['retry']} (the same effective batch)"
    return md


def frame(rows: list[dict], dtypes: dict[str, str]) -> pd.DataFrame:
    """A plot's data with its column types set even with no rows: the plot takes an axis's kind
    (numbers or categories) from the first frame it gets, and an empty frame's columns read as
    categories (a loss axis labelled with every value, no line drawn, until the page reloads)."""
    return pd.DataFrame(rows, columns=list(dtypes)).astype(dtypes)


CURVE = {"step": "int64", "value": "float64", "series": "object"}
LR = {"step": "int64", "lr": "float64"}
OVERLAY = {"step": "int64", "loss": "float64", "run": "object"}


def curve_frames(v: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = [{"step": s, "value": y, "series": "loss"} for s, y in v["loss"]]
    rows += [{"step": s, "value": y, "series": "eval_loss"} for s, y in v["eval_loss"]]
    return frame(rows, CURVE), frame([{"step": s, "lr": y} for s, y in v["lr"]], LR)


REWARDS = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")


def rewards(events: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """A preference run's curves: {"rewards/margins": [(step, v)], ...} (empty for SFT runs)."""
    out: dict[str, list] = {k: [] for k in REWARDS}
    for e in events:
        step = _finite(e.get("step"))
        if e.get("event") != "step" or step is None:
            continue
        for k in REWARDS:
            if _finite(e.get(k)) is not None:
                out[k].append((int(step), _finite(e[k])))
    return out if any(out.values()) else {}


def reward_frame(v: dict) -> pd.DataFrame:
    """The rewards plot's data: margin, accuracy, chosen and rejected rewards by step."""
    rows = [{"step": s, "value": y, "series": k.split("/")[1]} for k, pts in (v.get("rewards") or {}).items()
            for s, y in pts]
    return frame(rows, CURVE)


def x_range(v: dict) -> list[float] | None:
    """The loss plot's step axis: a little past the last point, so a point on the last step (an
    eval at the end) is drawn whole instead of cut in half by the plot's edge."""
    steps = [s for s, _ in v["loss"]] + [s for s, _ in v["eval_loss"]]
    if not steps:
        return None
    hi = max(max(steps), v.get("total_steps") or 0)
    return [0, hi + max(1, hi * 0.03)]


def run_api(run_dir: str) -> dict:
    """JSON-native live state (api_name="run_status")."""
    try:
        v = run_view(run_dir)
    except Exception as e:  # noqa: BLE001
        return {"error": error_text(e)}
    v = dict(v)
    if v.get("best"):  # a {"path": ...} dict reads as a file to gradio_client: name it otherwise
        v["best"] = {"step": v["best"]["step"], "eval_loss": v["best"]["eval_loss"], "dir": v["best"]["path"]}
    v["status_md"] = status_markdown(v) if v.get("status") else ""
    return v


def signature(run_dir: str | None) -> str:
    """Changes when anything the live view shows may have changed (file sizes and status)."""
    if not run_dir:
        return "none"
    p = Path(run_dir)
    sizes = []
    for name in ("metrics.jsonl", "train.log", "run.json"):
        try:
            st = (p / name).stat()
            sizes.append(f"{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            sizes.append("-")
    # a dead child is only noticed by runs.status(): re-check now and then even when files are still
    return f"{run_dir}|{'|'.join(sizes)}|{int(time.time() // 10)}"
