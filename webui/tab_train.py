"""Train tab: a preset or the form -> core.runs.create_run (config.yaml resolved, run.json) -> the
training child. The form is webui/train_form.py's FORM table; the live view (webui/train_view.py)
re-reads RUN_DIR on a gr.Timer tick, so closing the browser never touches the child; the history
(webui/train_history.py) compares and deletes runs. Also Stop, Resume and Retry."""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from pathlib import Path

import gradio as gr
import pandas as pd

from lorastudio.core import runs

from . import train_form
from .helpers import LOSS_COLORS, err_md, error_text, preset_names, workspace_run
from .train_form import CONTEXT, FORM_NAMES, build_config, preset_form
from .train_history import delete, diff_frame, history_frame, overlay_frame
from .train_view import (OVERLAY, curve_frames, frame, reward_frame, run_api, run_view, signature,
                         status_markdown, x_range)


_starting: set[str] = set()  # form keys whose Start is being handled right now
_starting_lock = threading.Lock()


def form_key(cfg) -> str:
    """The identity of what a Start would run: the config the form builds, before any run name is
    chosen for it. Recorded in run.json (form_key), so a second Start of the same form is
    recognised after a page reload or a server restart too."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def active_twin(key: str) -> dict | None:
    """A run of this workspace started from the same form that is still queued, starting or running."""
    return next((i for i in runs.list_runs() if i.get("form_key") == key and i.get("status") in runs.ACTIVE), None)


def start_from_dict(preset: str | None, values: dict) -> tuple[str, str, str]:
    """Create the run (core.runs.create_run: config.yaml resolved for this machine, run.json) and
    start its training child -> (run_dir, status md, the CLI command that reruns it). One click,
    one run: while a run of the same form is starting or active, Start is refused with a message
    (run_dir ""), however the clicks arrive (two tabs, a double click, the API)."""
    from lorastudio.core import config as config_lib
    from lorastudio.core import estimate, machine

    try:
        cfg = build_config(preset, values)
        problem = machine.gpus_problem(cfg.training.gpus, cfg.training.device)
        if problem:  # checked here too: nothing is created or started for a run that can't run
            raise config_lib.ConfigError(problem)
    except Exception as e:  # noqa: BLE001
        return "", err_md(e), ""
    key = form_key(cfg)
    with _starting_lock:
        busy = key in _starting
        _starting.add(key)
    if busy:
        return "", err_md("a run of this same form is being started: one click, one run (not started again)"), ""
    try:
        twin = active_twin(key)
        if twin:
            return "", err_md(f"**{Path(twin['run_dir']).name}** from this same form is still {twin['status']}: "
                              "not started again. Stop it first, or change a setting to start another run"), ""
        run_dir = runs.create_run(cfg, source=f"webui:{preset or 'form'}", form_key=key,
                                  notes=("from the web app" + (f" (preset {preset})" if preset else ""),))
    except Exception as e:  # noqa: BLE001
        return "", err_md(e), ""
    finally:
        with _starting_lock:
            _starting.discard(key)
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


# the /start event: (preset, *CONTEXT, *FORM) by name, as FORM lists them
start = train_form.with_form_signature(start_from_dict)


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
        new_dir = recovery.retry(workspace_run(run_dir))  # refuses any run but a failed one
    except Exception as e:  # noqa: BLE001
        return "", err_md(e)
    return str(new_dir), f"retrying as **{new_dir.name}**"


def button_states(v: dict) -> dict:
    """Which of Stop / Resume / Retry can act on the run on screen (as its live view reads it)."""
    status = v.get("status") or ""
    return {"stop": status in runs.ACTIVE, "resume": status in ("stopped", "failed"), "retry": status == "failed"}


SAMPLES_EMPTY = "No sample generations yet (the run writes them every `sample_every` steps)."
DIFF_EMPTY = "Pick two runs to compare their configs."


def empty_note(df: pd.DataFrame, text: str) -> str:
    return "" if len(df) else text


# ---------------------------------------------------------------- UI

def build(ui: dict) -> None:
    with gr.Row():
        names = preset_names()
        ui["preset"] = gr.Dropdown(names, value="tiny_demo" if "tiny_demo" in names else None,
                                   label="Preset (loads into the form)", scale=2, elem_id="preset")
        ui["start"] = gr.Button("Start", variant="primary", scale=1, elem_id="start-btn")
        # enabled by the live view for the run on screen (button_states): none of them acts on no run
        ui["stop"] = gr.Button("Stop", variant="stop", scale=1, elem_id="stop-btn", interactive=False)
        ui["resume"] = gr.Button("Resume", scale=1, elem_id="resume-btn", interactive=False)
        ui["retry"] = gr.Button("Retry", scale=1, elem_id="retry-btn", interactive=False)
    ui["start_md"] = gr.Markdown(elem_id="start-msg")
    with gr.Row():
        ui["gpu_mem"] = gr.Textbox(label="GPU memory (e.g. 24GB; blank = the detected GPU)", scale=1)
        ui["estimate_btn"] = gr.Button("Estimate VRAM", scale=0)
    ui["estimate_md"] = gr.Markdown(elem_id="vram-estimate")
    with gr.Accordion("Training options (model, data, template and cutoff come from their tabs)", open=False):
        ui["form"] = train_form.components()
    with gr.Row():
        ui["run"] = gr.Dropdown([], value=None, label="Run", allow_custom_value=True, scale=4, elem_id="run-select")
        ui["run_refresh"] = gr.Button("↻", scale=0, min_width=40)
    ui["run_status"] = gr.Markdown(elem_id="run-status")
    with gr.Row():
        ui["loss_plot"] = gr.LinePlot(x="step", y="value", color="series", title="Loss and eval loss", height=300,
                                      elem_id="loss-plot", color_map=LOSS_COLORS)
        ui["lr_plot"] = gr.LinePlot(x="step", y="lr", title="Learning rate", height=300, elem_id="lr-plot")
        # preference stages: reward margin, accuracy, chosen and rejected rewards (shown only for a
        # run that logs them: an SFT run has none, and an empty plot would read as a broken one)
        ui["rewards_plot"] = gr.LinePlot(x="step", y="value", color="series", title="Rewards (preference stages)",
                                         height=300, elem_id="rewards-plot", visible=False)
    ui["cli"] = gr.Textbox(label="CLI command that reproduces this run", buttons=["copy"], interactive=False,
                           elem_id="cli-cmd")
    ui["samples_empty"] = gr.Markdown(SAMPLES_EMPTY)
    ui["samples_df"] = gr.Dataframe(headers=["step", "prompt", "reply"], label="Sample generations",
                                    interactive=False, wrap=True, max_height=250, visible=False,
                                    column_widths=["8%", "40%", "52%"], elem_id="samples-df")
    ui["log"] = gr.Textbox(label="Log tail", lines=8, max_lines=20, interactive=False, autoscroll=True)
    ui["timer"] = gr.Timer(1.0)
    ui["seen"] = gr.State("")
    with gr.Accordion("Run history", open=False) as ui["hist_acc"]:
        ui["hist_refresh"] = gr.Button("Refresh history")
        ui["hist_empty"] = gr.Markdown("No runs yet.")
        ui["hist_df"] = gr.Dataframe(interactive=False, wrap=True, max_height=300, visible=False, elem_id="hist-df")
        ui["overlay_runs"] = gr.Dropdown([], multiselect=True, label="Overlay loss curves of")
        ui["overlay_plot"] = gr.LinePlot(x="step", y="loss", color="run", title="Loss overlay", height=280)
        with gr.Row():
            ui["diff_a"] = gr.Dropdown([], label="Config diff: run A", allow_custom_value=True)
            ui["diff_b"] = gr.Dropdown([], label="run B", allow_custom_value=True)
        ui["diff_empty"] = gr.Markdown(DIFF_EMPTY)
        ui["diff_df"] = gr.Dataframe(headers=["key", "a", "b"], interactive=False, wrap=True, visible=False,
                                     column_widths=["40%", "30%", "30%"], elem_id="diff-df")
        with gr.Row():
            ui["delete_run"] = gr.Dropdown([], label="Delete run", allow_custom_value=True)
            ui["delete_btn"] = gr.Button("Delete", variant="stop")
        ui["delete_md"] = gr.Markdown()
    with gr.Row(visible=False):
        ui["api_run_btn"] = gr.Button("run status api")
        ui["api_retry_btn"] = gr.Button("retry api")
        ui["api_run_json"] = gr.JSON()
        ui["api_diff_btn"] = gr.Button("config diff api")
        ui["api_history_btn"] = gr.Button("history api")
        ui["api_start_btn"] = gr.Button("start api")
        ui["api_start_dir"], ui["api_start_md"], ui["api_start_cli"] = gr.Textbox(), gr.Markdown(), gr.Textbox()
        ui["api_diff_df"] = gr.Dataframe()


def wire(ui: dict, demo) -> None:
    f = ui["form"]
    ctx = [ui[n] for n in CONTEXT]
    form_inputs = [f[n] for n in FORM_NAMES]  # the order of FORM, the order /start takes them

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
        """The runs on disk now (a run deleted meanwhile is never offered); the selection kept."""
        dirs = [i["run_dir"] for i in runs.list_runs()]
        value = selected if selected else (dirs[0] if dirs else None)
        return gr.Dropdown(choices=dirs, value=value)

    def do_start(*a):
        run_dir, md, cmd = start(*a)
        if not run_dir:  # refused or failed: the run on screen stays, the reason shows by Start
            gr.Warning(md.removeprefix("**Error:** ").replace("**", ""))
            return gr.skip(), md, gr.skip(), gr.skip()
        return run_dir, md, cmd, ""

    lock = lambda on: (lambda: gr.Button(interactive=on))  # noqa: E731
    # Start is off from the click until the run exists (trigger_mode="once" drops clicks meanwhile);
    # start_from_dict refuses a second run of the same form whatever the browser sends
    ui["start"].click(lock(False), None, [ui["start"]], queue=False, api_visibility="private",
                      trigger_mode="once").then(
        do_start, [ui["preset"]] + ctx + form_inputs, [ui["run"], ui["start_md"], ui["cli"], ui["seen"]],
        api_visibility="private").then(
        lambda r: choices_update(r), [ui["run"]], [ui["run"]], api_visibility="private").then(
        lock(True), None, [ui["start"]], queue=False, api_visibility="private")
    # /start: (run_dir or "" when refused, message, CLI command), the form's names as parameters
    ui["api_start_btn"].click(start, [ui["preset"]] + ctx + form_inputs,
                              [ui["api_start_dir"], ui["api_start_md"], ui["api_start_cli"]], api_name="start")
    ui["stop"].click(stop, [ui["run"]], [ui["start_md"]], api_name="stop")
    ui["resume"].click(resume, [ui["run"]], [ui["start_md"]], api_name="resume").then(
        lambda: "", None, [ui["seen"]], api_visibility="private")
    ui["retry"].click(lambda r: (lambda d, md: (d or gr.skip(), md))(*retry(r)), [ui["run"]],
                      [ui["run"], ui["start_md"]], api_visibility="private")
    ui["api_retry_btn"].click(lambda r: dict(zip(("run_dir", "message"), retry(r))), [ui["run"]],
                              [ui["api_run_json"]], api_name="retry")
    ui["run_refresh"].click(lambda r: choices_update(r), [ui["run"]], [ui["run"]], api_visibility="private")
    ui["run"].focus(lambda: gr.Dropdown(choices=[i["run_dir"] for i in runs.list_runs()]), None, [ui["run"]],
                    api_visibility="private", show_progress="hidden")  # choices only: typing stays
    # a fresh page (or a restarted server) re-attaches to the latest run: all state is in the run dir
    demo.load(lambda: (choices_update(), ""), None, [ui["run"], ui["seen"]], api_visibility="private")

    outs = [ui["run_status"], ui["loss_plot"], ui["lr_plot"], ui["rewards_plot"], ui["samples_df"], ui["samples_empty"], ui["log"],
            ui["cli"], ui["stop"], ui["resume"], ui["retry"], ui["seen"]]

    def tick(run_dir, seen):
        key = signature(run_dir)
        if key == seen:
            return [gr.skip()] * len(outs)
        try:
            v = run_view(run_dir)
        except Exception as e:  # noqa: BLE001 - e.g. a typed-in path outside the allowed folders
            off = [gr.Button(interactive=False)] * 3
            return [err_md(e)] + [gr.skip()] * (len(outs) - 5) + off + [key]
        loss, lr = curve_frames(v)
        samples = pd.DataFrame(v["samples"], columns=["step", "prompt", "reply"])
        b = button_states(v)
        # no points: no data at all (an empty frame fixes the plot's series and axes for good)
        return [status_markdown(v), gr.LinePlot(value=loss if len(loss) else None, x_lim=x_range(v)),
                lr if len(lr) else None,
                gr.LinePlot(value=reward_frame(v) if v.get("rewards") else None, x_lim=x_range(v),
                            visible=bool(v.get("rewards"))),
                gr.Dataframe(value=samples, visible=len(samples) > 0), empty_note(samples, SAMPLES_EMPTY), "\n".join(v["log"]), v.get("cli", ""),
                *(gr.Button(interactive=b[n]) for n in ("stop", "resume", "retry")), key]

    ui["timer"].tick(tick, [ui["run"], ui["seen"]], outs, api_visibility="private", show_progress="hidden")
    ui["run"].change(lambda r: tick(r, None), [ui["run"]], outs, api_visibility="private", show_progress="hidden")
    ui["api_run_btn"].click(run_api, [ui["run"]], [ui["api_run_json"]], api_name="run_status")

    def refresh_history():
        df = history_frame()
        dirs = list(df["run_dir"]) if len(df) else []
        upd = lambda: gr.Dropdown(choices=dirs)  # noqa: E731
        return (gr.Dataframe(value=df.drop(columns=["run_dir"]), visible=len(df) > 0), empty_note(df, "No runs yet."),
                upd(), upd(), upd(), upd())

    hist_outs = [ui["hist_df"], ui["hist_empty"], ui["overlay_runs"], ui["diff_a"], ui["diff_b"], ui["delete_run"]]
    ui["hist_refresh"].click(refresh_history, None, hist_outs, api_visibility="private")
    ui["api_history_btn"].click(lambda: history_frame().drop(columns=["run_dir"]), None, [ui["api_diff_df"]],
                                api_name="history")
    # the history is read whenever it can come into view: page load, the Train tab, the accordion
    demo.load(refresh_history, None, hist_outs, api_visibility="private")
    ui["tab_train"].select(refresh_history, None, hist_outs, api_visibility="private")
    ui["hist_acc"].expand(refresh_history, None, hist_outs, api_visibility="private")
    for dd in (ui["overlay_runs"], ui["diff_a"], ui["diff_b"], ui["delete_run"]):
        dd.focus(refresh_history, None, hist_outs, api_visibility="private", show_progress="hidden")
    def overlay_view(run_dirs_):  # None when empty, as the live plot (an empty frame fixes its series)
        df = _safe(overlay_frame, frame([], OVERLAY))(run_dirs_)
        return df if len(df) else None

    ui["overlay_runs"].change(overlay_view, [ui["overlay_runs"]], [ui["overlay_plot"]], api_visibility="private")

    def diff_view(a, b):
        df = _safe(diff_frame, pd.DataFrame(columns=["key", "a", "b"]))(a, b)
        note = DIFF_EMPTY if not (a and b) else "The two configs are the same." if not len(df) else ""
        return gr.Dataframe(value=df, visible=len(df) > 0), note

    diff_outs = [ui["diff_df"], ui["diff_empty"]]
    ui["diff_b"].change(diff_view, [ui["diff_a"], ui["diff_b"]], diff_outs, api_visibility="private")
    ui["diff_a"].change(diff_view, [ui["diff_a"], ui["diff_b"]], diff_outs, api_visibility="private")
    ui["api_diff_btn"].click(_safe(diff_frame, pd.DataFrame(columns=["key", "a", "b"])), [ui["diff_a"], ui["diff_b"]],
                             [ui["api_diff_df"]], api_name="config_diff")
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


