"""Train tab: a preset or the form -> RUN_DIR/config.yaml -> core.runs.launch (a child process).
Live view: a gr.Timer re-reads RUN_DIR/metrics.jsonl (the state lives in the run dir, not in this
process), so a page reload or a server restart re-attaches with the full curve, and closing the
browser never touches the child. Also: Stop/Resume, run history (curve overlay, config diff,
disk use, delete) and the best checkpoint by eval loss."""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import gradio as gr
import pandas as pd
import yaml

from lorastudio.core import history, runs

from .helpers import (err_md, error_text, fmt_seconds, number, parse_columns, parse_sources, preset_names, readable,
                      whole, workspace_run)

# Form fields in the order the Start event passes them (after preset, model, trust, data, fmt, columns,
# template, custom_jinja, cutoff). Each maps to a config path.
FORM = [  # (name, config path, label, default)
    ("method", "method", "Method", "lora"),
    ("lora_r", "lora.r", "LoRA r", 16),
    ("lora_alpha", "lora.alpha", "LoRA alpha", 32),
    ("lora_dropout", "lora.dropout", "LoRA dropout", 0.0),
    ("lora_targets", "lora.target_modules", "Target modules (all-linear or q_proj, v_proj, ...)", "all-linear"),
    ("use_dora", "lora.use_dora", "DoRA", False),
    ("use_rslora", "lora.use_rslora", "rsLoRA", False),
    ("quant_bits", "quantization.bits", "Quantization bits (QLoRA)", 4),
    ("learning_rate", "training.learning_rate", "Learning rate", 2e-4),
    ("epochs", "training.epochs", "Epochs", 3.0),
    ("max_steps", "training.max_steps", "Max steps (-1 = by epochs)", -1),
    ("micro_batch_size", "training.micro_batch_size", "Micro-batch size", 4),
    ("grad_accum", "training.grad_accum", "Gradient accumulation", 4),
    ("packing", "template.packing", "Packing", False),
    ("eval_split", "data.eval_split", "Eval split", 0.0),
    ("eval_steps", "training.eval_steps", "Eval every (steps)", 50),
    ("save_steps", "training.save_steps", "Save every (steps)", 100),
    ("sample_every", "training.sample_every", "Sample every (steps, 0 = at the end)", 0),
    ("sample_prompts", "training.sample_prompts", "Sample prompts (one per line)", ""),
    ("run_name", "output.run_name", "Run name (optional)", ""),
    ("early_stopping", "training.early_stopping_patience", "Early stopping: evals without a better eval loss (0 = off)", 0),
    ("gpus", "training.gpus", "GPUs (processes; >1 starts accelerate launch)", 1),
    ("strategy", "training.strategy", "Multi-GPU strategy", "ddp"),
    ("offload", "training.offload", "Offload to CPU RAM (fsdp/zero)", False),
    ("gpu_memory", "training.gpu_memory_gib", "GPU memory budget (GiB; 0 = the card's free memory)", 0),
]
FORM_NAMES = [f[0] for f in FORM]
CONTEXT = ["model", "trust_remote_code", "data", "fmt", "columns", "template", "custom_jinja", "cutoff"]


def _get(d: dict, path: str):
    for p in path.split("."):
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _set(d: dict, path: str, value) -> None:
    parts = path.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def preset_dict(preset: str | None) -> dict:
    from lorastudio import presets

    if not preset:
        return {}
    path = presets.find(preset)
    if path is None:
        raise ValueError(f"no preset {preset!r} (choose one of {', '.join(preset_names())})")
    return yaml.safe_load(path.read_text()) or {}


def preset_form(preset: str) -> dict:
    """Form values (FORM names + context names) for a preset: its values over the RunConfig defaults."""
    from lorastudio.core import config as config_lib

    cfg = config_lib.from_dict(preset_dict(preset), preset).model_dump(mode="json")
    out = {}
    for name, path, _label, _default in FORM:
        v = _get(cfg, path)
        if name == "lora_targets":
            v = v if isinstance(v, str) else ", ".join(v)
        elif name == "sample_prompts":
            v = "\n".join(v or [])
        elif name == "quant_bits":
            v = v or 4
        elif name == "run_name":
            v = v or ""
        elif name in ("early_stopping", "gpu_memory"):
            v = v or 0
        out[name] = v
    src = cfg["data"]["sources"]
    out.update(model=cfg["model"]["name_or_path"], trust_remote_code=cfg["model"]["trust_remote_code"],
               data="\n".join(s["path"] + (f" | {s['ratio']}" if s.get("ratio", 1.0) != 1.0 else "") for s in src),
               fmt=src[0].get("format", "auto"), columns=", ".join(f"{k}={v}" for k, v in (src[0].get("columns") or {}).items()),
               template=cfg["template"]["name"], custom_jinja=cfg["template"]["custom_jinja"] or "",
               cutoff=cfg["template"]["cutoff_len"])
    return out


def build_config(preset: str | None, values: dict):
    """RunConfig from a preset (or the defaults) with the form VALUES over it (missing keys keep
    the preset's value). Raises ConfigError/ValueError with a readable message."""
    from lorastudio.core import config as config_lib

    data = preset_dict(preset)
    for name, path, label, _default in FORM:
        if name not in values or values[name] is None:
            continue
        v = values[name]
        if name == "lora_targets":
            v = v.strip() or "all-linear"
            v = v if v == "all-linear" else [t.strip() for t in v.split(",") if t.strip()]
        elif name == "sample_prompts":
            v = [line.strip() for line in str(v).splitlines() if line.strip()]
        elif name == "quant_bits":
            continue  # set below, with the method
        elif name == "run_name":
            v = str(v).strip() or None
        elif name == "early_stopping":
            v = whole(v, label) or None  # 0 = off
        elif name == "gpu_memory":
            v = number(v, label) or None  # 0 = the card's free memory
        elif name in ("lora_r", "max_steps", "micro_batch_size", "grad_accum", "eval_steps", "save_steps",
                      "sample_every", "gpus"):
            v = whole(v, label)
        elif name in ("lora_alpha", "lora_dropout", "learning_rate", "epochs", "eval_split"):
            v = number(v, label)
        elif name in ("method", "strategy"):
            v = str(v)
        _set(data, path, v)
    method = values.get("method") or data.get("method", "lora")
    bits = values.get("quant_bits")
    if method == "qlora":
        _set(data, "quantization.bits", whole(bits or 4, "Quantization bits"))
    elif "quant_bits" in values:
        _set(data, "quantization.bits", None)
    if values.get("model"):
        _set(data, "model.name_or_path", readable(values["model"]))
    if values.get("trust_remote_code") is not None:
        _set(data, "model.trust_remote_code", bool(values["trust_remote_code"]))
    if values.get("data"):
        cols = parse_columns(values.get("columns") or "")
        sources = []
        for s in parse_sources(values["data"]):
            s["path"] = readable(s["path"])
            s["format"] = s.get("format") or values.get("fmt") or "auto"
            if cols:
                s["columns"] = cols
            sources.append(s)
        _set(data, "data.sources", sources)
    if values.get("template"):
        _set(data, "template.name", values["template"])
        _set(data, "template.custom_jinja", (values.get("custom_jinja") or None) if values["template"] == "custom"
             else None)
    if values.get("cutoff"):
        _set(data, "template.cutoff_len", whole(values["cutoff"], "Cutoff length"))
    return config_lib.from_dict(data, f"preset {preset}" if preset else "the form")


def start_from_dict(preset: str | None, values: dict) -> tuple[str, str, str]:
    """Create the run (core.runs.create_run: config.yaml resolved for this machine, run.json) and
    start its training child -> (run_dir, status md, the CLI command that reruns it)."""
    from lorastudio.core import config as config_lib
    from lorastudio.core import estimate, machine

    try:
        cfg = build_config(preset, values)
        problem = machine.gpus_problem(cfg.training.gpus, cfg.training.device)
        if problem:  # checked here too: nothing is created or started for a run that can't run
            raise config_lib.ConfigError(problem)
        run_dir = runs.create_run(cfg, source=f"webui:{preset or 'form'}",
                                  notes=("from the web app" + (f" (preset {preset})" if preset else ""),))
    except Exception as e:  # noqa: BLE001
        return "", err_md(e), ""
    warnings = "".join(f"\n\n⚠️ {w}" for w in estimate.start_warnings(cfg))
    return str(run_dir), f"started **{run_dir.name}**{warnings}", f"lorastudio train {run_dir / 'config.yaml'}"


def estimate_view(preset: str | None, values: dict, gpu_mem: str | None = None) -> str:
    """Markdown: the pre-flight VRAM estimate of what Start would run (pure arithmetic, no torch)."""
    from .estimate_view import estimate_markdown

    try:
        cfg = build_config(preset or None, values)
    except Exception as e:  # noqa: BLE001
        return f"VRAM estimate unavailable: {error_text(e)}"
    return estimate_markdown(cfg, gpu_mem or None)


def start(preset: str, model: str, trust_remote_code: bool, data: str, fmt: str, columns: str, template: str,
          custom_jinja: str, cutoff: float, method: str, lora_r: float, lora_alpha: float, lora_dropout: float,
          lora_targets: str, use_dora: bool, use_rslora: bool, quant_bits: float, learning_rate: float,
          epochs: float, max_steps: float, micro_batch_size: float, grad_accum: float, packing: bool,
          eval_split: float, eval_steps: float, save_steps: float, sample_every: float, sample_prompts: str,
          run_name: str, early_stopping: float = 0, gpus: float = 1, strategy: str = "ddp", offload: bool = False,
          gpu_memory: float = 0):
    values = dict(locals())
    preset = values.pop("preset")
    return start_from_dict(preset or None, values)


def stop(run_dir: str) -> str:
    try:
        return f"stop: **{runs.stop(workspace_run(run_dir), grace=30)}**"
    except Exception as e:  # noqa: BLE001
        return err_md(e)


def resume(run_dir: str) -> str:
    try:
        run_dir = workspace_run(run_dir)
        info = runs.status(run_dir)
        if info.get("status") in runs.ACTIVE:
            return err_md(f"{Path(run_dir).name} is still {info['status']}")
        if info.get("status") == "done":
            return err_md(f"{Path(run_dir).name} finished; start a new run to train more")
        runs.launch(run_dir, resume=True)
    except Exception as e:  # noqa: BLE001
        return err_md(e)
    ckpt = runs.last_checkpoint(run_dir)
    return f"resuming **{Path(run_dir).name}** from {ckpt.name if ckpt else 'step 0'}"


def retry(run_dir: str) -> tuple[str, str]:
    """The one-click retry of a failed run (core.recovery: after out-of-memory, half the micro-batch
    and double the accumulation) -> (new run dir, status md)."""
    from lorastudio.core import recovery

    try:
        run_dir = workspace_run(run_dir)
        info = runs.status(run_dir)
        if info.get("status") != "failed":
            return "", err_md(f"only a failed run can be retried ({Path(run_dir).name} is "
                              f"{info.get('status', 'not a run')})")
        new_dir = recovery.retry(run_dir)
    except Exception as e:  # noqa: BLE001
        return "", err_md(e)
    return str(new_dir), f"retrying as **{new_dir.name}**"


# ---------------------------------------------------------------- the live view (pure data)

def _finite(x) -> float | None:
    """A number from metrics.jsonl or run.json (anybody's file), else None."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def run_view(run_dir: str) -> dict:
    """Everything the live view shows for RUN_DIR, read from the run directory alone."""
    if not (run_dir or "").strip():
        return {"run_dir": "", "status": "", "loss": [], "eval_loss": [], "lr": [], "samples": [],
                "log": [], "best": None}
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


def curve_frames(v: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = [{"step": s, "value": y, "series": "loss"} for s, y in v["loss"]]
    rows += [{"step": s, "value": y, "series": "eval_loss"} for s, y in v["eval_loss"]]
    loss = pd.DataFrame(rows, columns=["step", "value", "series"])
    lr = pd.DataFrame([{"step": s, "lr": y} for s, y in v["lr"]], columns=["step", "lr"])
    return loss, lr


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


# ---------------------------------------------------------------- history (pure data)

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
    return pd.DataFrame(rows, columns=["step", "loss", "run"])


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


# ---------------------------------------------------------------- UI

def _num(label, value, **kw):
    return gr.Number(value=value, label=label, **kw)


def build(ui: dict) -> None:
    with gr.Row():
        names = preset_names()
        ui["preset"] = gr.Dropdown(names, value="tiny_smoke" if "tiny_smoke" in names else None,
                                   label="Preset (loads into the form)", scale=2)
        ui["start"] = gr.Button("Start", variant="primary", scale=1, elem_id="start-btn")
        ui["stop"] = gr.Button("Stop", variant="stop", scale=1, elem_id="stop-btn")
        ui["resume"] = gr.Button("Resume", scale=1)
        ui["retry"] = gr.Button("Retry", scale=1)
    with gr.Row():
        ui["gpu_mem"] = gr.Textbox(label="GPU memory (e.g. 24GB; blank = the detected GPU)", scale=1)
        ui["estimate_btn"] = gr.Button("Estimate VRAM", scale=0)
    ui["estimate_md"] = gr.Markdown(elem_id="vram-estimate")
    with gr.Accordion("Training options (model, data, template and cutoff come from their tabs)", open=False):
        f = {}
        with gr.Row():
            f["method"] = gr.Radio(["lora", "qlora", "full"], value="lora", label="Method")
            f["quant_bits"] = gr.Dropdown([4, 8], value=4, label="Quantization bits (QLoRA)")
            f["run_name"] = gr.Textbox(label="Run name (optional)")
        with gr.Row():
            f["lora_r"] = _num("LoRA r", 16, precision=0)
            f["lora_alpha"] = _num("LoRA alpha", 32)
            f["lora_dropout"] = _num("LoRA dropout", 0.05)
            f["lora_targets"] = gr.Textbox(value="all-linear", label="Target modules")
            f["use_dora"] = gr.Checkbox(label="DoRA")
            f["use_rslora"] = gr.Checkbox(label="rsLoRA")
        with gr.Row():
            f["learning_rate"] = _num("Learning rate", 2e-4)
            f["epochs"] = _num("Epochs", 3.0)
            f["max_steps"] = _num("Max steps (-1 = by epochs)", -1, precision=0, elem_id="max-steps")
            f["micro_batch_size"] = _num("Micro-batch size", 4, precision=0)
            f["grad_accum"] = _num("Gradient accumulation", 4, precision=0)
        with gr.Row():
            f["packing"] = gr.Checkbox(label="Packing")
            f["eval_split"] = _num("Eval split (fraction)", 0.0)
            f["eval_steps"] = _num("Eval every (steps)", 50, precision=0)
            f["save_steps"] = _num("Save every (steps)", 100, precision=0)
            f["sample_every"] = _num("Sample every (steps, 0 = at the end)", 0, precision=0)
            f["early_stopping"] = _num("Early stopping patience (evals; 0 = off; needs an eval split)", 0,
                                       precision=0)
        with gr.Row():
            f["gpus"] = _num("GPUs (1 = this process; more starts `accelerate launch`)", 1, precision=0)
            f["strategy"] = gr.Dropdown(["ddp", "fsdp", "zero2", "zero3"], value="ddp",
                                        label="Strategy (ddp: a copy per GPU; fsdp/zero3 shard the model; "
                                              "zero2/zero3 need DeepSpeed installed)")
            f["offload"] = gr.Checkbox(label="Offload params/optimizer to CPU RAM (fsdp/zero only)")
            f["gpu_memory"] = _num("GPU memory budget (GiB; 0 = the card's free memory; auto settings "
                                   "trade speed for memory to fit it)", 0)
        f["sample_prompts"] = gr.Textbox(label="Sample prompts (one per line)", lines=2)
        ui["form"] = f
    with gr.Row():
        ui["run"] = gr.Dropdown([], value=None, label="Run", allow_custom_value=True, scale=4, elem_id="run-select")
        ui["run_refresh"] = gr.Button("↻", scale=0, min_width=40)
    ui["run_status"] = gr.Markdown(elem_id="run-status")
    with gr.Row():
        ui["loss_plot"] = gr.LinePlot(x="step", y="value", color="series", title="Loss and eval loss", height=300,
                                      elem_id="loss-plot", color_map={"loss": "#3b82f6", "eval_loss": "#f97316"})
        ui["lr_plot"] = gr.LinePlot(x="step", y="lr", title="Learning rate", height=300, elem_id="lr-plot")
    ui["cli"] = gr.Textbox(label="CLI command that reproduces this run", buttons=["copy"], interactive=False,
                           elem_id="cli-cmd")
    ui["samples_df"] = gr.Dataframe(headers=["step", "prompt", "reply"], label="Sample generations",
                                    interactive=False, wrap=True, max_height=250)
    ui["log"] = gr.Textbox(label="Log tail", lines=8, max_lines=20, interactive=False, autoscroll=True)
    ui["timer"] = gr.Timer(1.0)
    ui["seen"] = gr.State("")
    with gr.Accordion("Run history", open=False):
        ui["hist_refresh"] = gr.Button("Refresh history")
        ui["hist_df"] = gr.Dataframe(interactive=False, wrap=True, max_height=300)
        ui["overlay_runs"] = gr.Dropdown([], multiselect=True, label="Overlay loss curves of")
        ui["overlay_plot"] = gr.LinePlot(x="step", y="loss", color="run", title="Loss overlay", height=280)
        with gr.Row():
            ui["diff_a"] = gr.Dropdown([], label="Config diff: run A", allow_custom_value=True)
            ui["diff_b"] = gr.Dropdown([], label="run B", allow_custom_value=True)
        ui["diff_df"] = gr.Dataframe(headers=["key", "a", "b"], interactive=False, wrap=True)
        with gr.Row():
            ui["delete_run"] = gr.Dropdown([], label="Delete run", allow_custom_value=True)
            ui["delete_btn"] = gr.Button("Delete", variant="stop")
        ui["delete_md"] = gr.Markdown()
    with gr.Row(visible=False):
        ui["api_run_btn"] = gr.Button("run status api")
        ui["api_retry_btn"] = gr.Button("retry api")
        ui["api_run_json"] = gr.JSON()


def wire(ui: dict, demo) -> None:
    f = ui["form"]
    ctx = [ui[n] for n in CONTEXT]
    form_inputs = [f[n] for n in FORM_NAMES]

    def load_preset(preset):
        try:
            v = preset_form(preset)
        except Exception as e:  # noqa: BLE001
            gr.Warning(error_text(e))
            return [gr.skip()] * (len(CONTEXT) + len(FORM_NAMES))
        return [v[n] for n in CONTEXT] + [v[n] for n in FORM_NAMES]

    def do_estimate(preset, gpu_mem, *a):
        return estimate_view(preset, dict(zip(CONTEXT + FORM_NAMES, a)), gpu_mem)

    est_inputs = [ui["preset"], ui["gpu_mem"]] + ctx + form_inputs
    ui["estimate_btn"].click(do_estimate, est_inputs, [ui["estimate_md"]], api_name="estimate")
    ui["preset"].change(load_preset, [ui["preset"]], ctx + form_inputs, api_name="load_preset").then(
        do_estimate, est_inputs, [ui["estimate_md"]], api_visibility="private")
    demo.load(load_preset, [ui["preset"]], ctx + form_inputs, api_visibility="private")

    def choices_update(selected: str | None = None):
        dirs = [i["run_dir"] for i in runs.list_runs()]
        value = selected if selected else (dirs[0] if dirs else None)
        return gr.Dropdown(choices=dirs, value=value)

    @functools.wraps(start)
    def do_start(*a):
        run_dir, md, cmd = start(*a)
        return (run_dir or gr.skip()), md, cmd, ""

    ui["start"].click(do_start, [ui["preset"]] + ctx + form_inputs, [ui["run"], ui["run_status"], ui["cli"], ui["seen"]],
                      api_name="start").then(lambda r: choices_update(r), [ui["run"]], [ui["run"]],
                                             api_visibility="private")
    ui["stop"].click(stop, [ui["run"]], [ui["run_status"]], api_name="stop")
    ui["resume"].click(resume, [ui["run"]], [ui["run_status"]], api_name="resume").then(
        lambda: "", None, [ui["seen"]], api_visibility="private")
    ui["retry"].click(lambda r: (lambda d, md: (d or gr.skip(), md))(*retry(r)), [ui["run"]],
                      [ui["run"], ui["run_status"]], api_visibility="private")
    ui["api_retry_btn"].click(lambda r: dict(zip(("run_dir", "message"), retry(r))), [ui["run"]],
                              [ui["api_run_json"]], api_name="retry")
    ui["run_refresh"].click(lambda r: choices_update(r), [ui["run"]], [ui["run"]], api_visibility="private")
    # a fresh page (or a restarted server) re-attaches to the latest run: all state is in the run dir
    demo.load(lambda: (choices_update(), ""), None, [ui["run"], ui["seen"]], api_visibility="private")

    outs = [ui["run_status"], ui["loss_plot"], ui["lr_plot"], ui["samples_df"], ui["log"], ui["cli"], ui["seen"]]

    def tick(run_dir, seen):
        key = _signature(run_dir)
        if key == seen:
            return [gr.skip()] * len(outs)
        try:
            v = run_view(run_dir)
        except Exception as e:  # noqa: BLE001 - e.g. a typed-in path outside the allowed folders
            return [err_md(e)] + [gr.skip()] * (len(outs) - 2) + [key]
        loss, lr = curve_frames(v)
        samples = pd.DataFrame(v["samples"], columns=["step", "prompt", "reply"])
        return [status_markdown(v), loss, lr, samples, "\n".join(v["log"]), v.get("cli", ""), key]

    ui["timer"].tick(tick, [ui["run"], ui["seen"]], outs, api_visibility="private", show_progress="hidden")
    ui["run"].change(lambda r: tick(r, None), [ui["run"]], outs, api_visibility="private", show_progress="hidden")
    ui["api_run_btn"].click(run_api, [ui["run"]], [ui["api_run_json"]], api_name="run_status")

    def refresh_history():
        df = history_frame()
        dirs = list(df["run_dir"]) if len(df) else []
        upd = lambda: gr.Dropdown(choices=dirs)  # noqa: E731
        return df.drop(columns=["run_dir"]), upd(), upd(), upd(), upd()

    hist_outs = [ui["hist_df"], ui["overlay_runs"], ui["diff_a"], ui["diff_b"], ui["delete_run"]]
    ui["hist_refresh"].click(refresh_history, None, hist_outs, api_name="history")
    ui["overlay_runs"].change(_safe(overlay_frame, pd.DataFrame(columns=["step", "loss", "run"])), [ui["overlay_runs"]], [ui["overlay_plot"]], api_visibility="private")
    ui["diff_b"].change(_safe(diff_frame, pd.DataFrame(columns=["key", "a", "b"])), [ui["diff_a"], ui["diff_b"]], [ui["diff_df"]], api_name="config_diff")
    ui["diff_a"].change(_safe(diff_frame, pd.DataFrame(columns=["key", "a", "b"])), [ui["diff_a"], ui["diff_b"]], [ui["diff_df"]], api_visibility="private")
    ui["delete_btn"].click(delete, [ui["delete_run"]], [ui["delete_md"]], api_name="delete_run").then(
        refresh_history, None, hist_outs, api_visibility="private")


def _safe(fn, fallback):
    """FN for an event: an error becomes a warning toast (one line) and FALLBACK."""
    @functools.wraps(fn)
    def wrapper(*a):
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001
            gr.Warning(error_text(e))
            return fallback
    return wrapper


def _signature(run_dir: str | None) -> str:
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
