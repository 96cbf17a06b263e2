"""Evaluate tab: score a run's checkpoints (and the base) on its held-out rows or a file, follow the
job, plot the scores over checkpoints, and list the rows whose answers changed between two of them.

The work is core.evaluate's child job (`python -m lorastudio.core.evaluate`, output to
RUN_DIR/eval/eval.log), reporting evaluate_* events with its pid in RUN_DIR/metrics.jsonl; the
results are its files RUN_DIR/eval/<data-stem>__<target>.json, which this tab reads. The helpers
return data (lists, dicts, DataFrames), not components."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from lorastudio.core import evaluate as evaluate_lib
from lorastudio.core import runs, safe_io

from .helpers import err_md, readable, whole, workspace_run
from .tab_convert import checkpoint_choices

METRICS = ["exact_match", "chrf", "loss", "perplexity", "reward_accuracy"]  # reward accuracy: preference runs
MAX_RESULT = 64 * 2**20  # a result file read at most (a row's answer each)
SCORE_COLUMNS = ["target", "step", "rows", "loss", "perplexity", "exact_match", "chrf", "reward_accuracy"]
CHANGED_COLUMNS = ["row", "prompt", "reference", "answer_a", "answer_b", "exact_a", "exact_b"]
_JOBS: dict[str, object] = {}  # run dir -> the Popen of its evaluation started by this server (Stop signals it)


def target_choices(run_dir: str | None) -> list[str]:
    """final and the checkpoints with an adapter (Convert's list), or final for a full fine-tune."""
    if not run_dir:
        return []
    return checkpoint_choices(run_dir) or (["final"] if (Path(run_dir) / "model" / "config.json").is_file() else [])


def run_choices() -> list[str]:
    """Runs with something to score, newest first, as on disk now."""
    return [i["run_dir"] for i in runs.list_runs() if target_choices(i["run_dir"])]


# ---------------------------------------------------------------- results on disk

def results(run_dir: str | None) -> dict[str, dict[str, dict]]:
    """{data stem: {target: its result file's contents}} of RUN_DIR/eval, as on disk now."""
    out: dict[str, dict[str, dict]] = {}
    folder = evaluate_lib.eval_dir(run_dir) if run_dir else None
    if folder is None or not folder.is_dir():
        return out
    for p in sorted(folder.glob("*__*.json")):
        try:
            data = safe_io.read_json(p, MAX_RESULT)
        except safe_io.FileProblem:
            continue
        if isinstance(data, dict) and isinstance(data.get("target"), str):
            stem = p.name[:-len(".json")].rpartition("__")[0]
            out.setdefault(stem, {})[data["target"]] = data
    return out


def _ordered(found: dict[str, dict]) -> list[dict]:
    """Base first, then by step; final after the checkpoint of its step."""
    return sorted(found.values(), key=lambda r: (r["target"] != evaluate_lib.BASE, r.get("step") or 0,
                                                 r["target"] == evaluate_lib.FINAL))


def scores_table(run_dir: str | None, stem: str | None) -> pd.DataFrame:
    rows = [{k: round(r[k], 4) if isinstance(r.get(k), float) else r.get(k) for k in SCORE_COLUMNS}
            for r in _ordered(results(run_dir).get(stem or "", {}))]
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def scores_frame(run_dir: str | None, stem: str | None, metric: str) -> pd.DataFrame:
    """One metric over the targets by step (the base at step 0) for gr.LinePlot; final is left
    out where a checkpoint of its step is there (the same weights)."""
    found = results(run_dir).get(stem or "", {})
    steps = {r.get("step") for r in found.values() if r["target"].startswith("checkpoint-")}
    rows = [{"step": r.get("step") or 0, "value": r.get(metric), "target": r["target"], "metric": metric}
            for r in _ordered(found)
            if r.get(metric) is not None and not (r["target"] == evaluate_lib.FINAL and r.get("step") in steps)]
    return pd.DataFrame(rows, columns=["step", "value", "target", "metric"])


def changed_rows(run_dir: str | None, stem: str | None, a: str | None, b: str | None) -> list[dict]:
    """The rows whose greedy answers differ between targets A and B."""
    found = results(run_dir).get(stem or "", {})
    if a not in found or b not in found:
        return []
    other = {r["row"]: r for r in found[b].get("answers") or [] if "answer" in r}
    out = []
    for r in found[a].get("answers") or []:
        s = other.get(r.get("row"))
        if s is not None and "answer" in r and r["answer"] != s["answer"]:
            out.append({"row": r["row"], "prompt": r.get("prompt"), "reference": r.get("reference"),
                        "answer_a": r["answer"], "answer_b": s["answer"], "exact_a": r.get("exact"),
                        "exact_b": s.get("exact")})
    return out


# ---------------------------------------------------------------- the job

def launch_eval(run_dir: str, targets: list[str] | None, data: str | None, base: bool, limit=0,
                max_new_tokens=256):
    """Start the evaluation child; returns (Popen, start time)."""
    run_dir = workspace_run(run_dir)
    info = runs.status(run_dir)
    if info.get("status") in runs.ACTIVE:
        raise ValueError(f"{Path(run_dir).name} is still {info['status']}: wait for it to finish or stop it")
    choices = target_choices(run_dir)
    bad = [t for t in targets or [] if t not in choices]
    if not choices or bad:
        raise ValueError(f"{Path(run_dir).name} has no {bad[0] if bad else 'adapter or checkpoint'} to evaluate"
                         + (f" (it has {', '.join(choices)})" if choices else ""))
    job = _JOBS.get(run_dir)
    if job is not None and job.poll() is None:
        raise ValueError(f"{Path(run_dir).name} is already being evaluated: stop it first")
    cmd = [sys.executable, "-m", "lorastudio.core.evaluate", run_dir,
           "--max-new-tokens", str(whole(max_new_tokens, "Max new tokens", 1, 32768))]
    if targets:
        cmd += ["--checkpoint", ",".join(t.removeprefix("checkpoint-") for t in targets)]
    if (data or "").strip():
        cmd += ["--data", readable(data)]
    if base:
        cmd.append("--base")
    if whole(limit or 0, "Rows", 0, 10_000_000):
        cmd += ["--limit", str(whole(limit, "Rows", 0))]
    t0 = time.time()
    proc = runs.spawn(cmd, evaluate_lib.eval_dir(run_dir) / "eval.log", cwd=run_dir)
    _JOBS[run_dir] = proc
    return proc, t0


def stop_eval(run_dir: str | None) -> str:
    """SIGTERM the evaluation this server started for RUN_DIR (it stops between rows)."""
    try:
        run_dir = workspace_run(run_dir)
    except Exception as e:  # noqa: BLE001
        return err_md(e)
    job = _JOBS.get(run_dir)
    if job is None or job.poll() is not None:
        return "no evaluation of this run is running here"
    os.killpg(job.pid, signal.SIGTERM)
    return "⏹ stopping (between rows; the files already written stay)"


def progress(run_dir: str, pid: int, since: float) -> str:
    """What the job with PID has done, from its evaluate_* events."""
    events, _ = runs.read_events(run_dir)
    mine = [e for e in events if e.get("pid") == pid and str(e.get("event", "")).startswith("evaluate_")
            and isinstance(e.get("time"), (int, float)) and e["time"] >= since - 1]
    last = next((e for e in reversed(mine) if e["event"] == "evaluate_progress"), None)
    start = next((e for e in mine if e["event"] == "evaluate_start"), None)
    if last is None:
        return f"⏳ loading {len(start['targets'])} targets, {start['rows']} rows" if start else "⏳ starting"
    return (f"⏳ target {last['target_index'] + 1}/{last['targets']} ({last['target']}): "
            f"{last['done']}/{last['total']} rows")


def outcome(run_dir: str, pid: int, code: int | None) -> str:
    events, _ = runs.read_events(run_dir)
    mine = [e for e in events if e.get("pid") == pid]
    end = next((e for e in reversed(mine) if e["event"] in ("evaluate_end", "evaluate_failed", "evaluate_stopped")),
               None)
    if end is None:
        return err_md(f"the evaluation exited ({code}) without a result; see the log")
    if end["event"] == "evaluate_failed":
        return err_md(end.get("error", "evaluation failed"))
    done = [e for e in mine if e["event"] == "evaluate_target"]
    head = "⏹ stopped" if end["event"] == "evaluate_stopped" else f"✅ done in {end.get('elapsed_s', 0):.1f}s"
    return head + "".join(f"\n- `{e['target']}`: exact match {_fmt(e.get('exact_match'))}, chrF {_fmt(e.get('chrf'))}, "
                          f"loss {_fmt(e.get('loss'))}, perplexity {_fmt(e.get('perplexity'))}" for e in done)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def eval_job(run_dir, targets, data, base, limit, max_new_tokens):
    """Generator: (status md, log tail) while the child runs, then its outcome."""
    try:
        proc, t0 = launch_eval(run_dir, targets, data, base, limit, max_new_tokens)
        run_dir = workspace_run(run_dir)
    except Exception as e:  # noqa: BLE001 - shown to the user as a message
        yield err_md(e), ""
        return
    log = evaluate_lib.eval_dir(run_dir) / "eval.log"
    while proc.poll() is None:
        yield f"{progress(run_dir, proc.pid, t0)} · {time.time() - t0:.0f}s", _tail(log)
        time.sleep(0.5)
    yield outcome(run_dir, proc.pid, proc.returncode), _tail(log)


def _tail(path: Path, n: int = 12) -> str:
    return "\n".join(safe_io.tail_bytes(path, 64 * 1024).decode("utf-8", "replace").splitlines()[-n:])


# ---------------------------------------------------------------- the view

def build(ui: dict) -> None:
    gr.Markdown("Score a run's checkpoints on the rows it held out (or a file of yours): loss and perplexity of the "
                "trained tokens, exact match and chrF of greedy answers to the last assistant turn. Runs as a child "
                "job; results land in RUN_DIR/eval/.")
    with gr.Row():
        ui["ev_run"] = gr.Dropdown([], label="Run", allow_custom_value=True, scale=3, elem_id="ev-run")
        ui["ev_targets"] = gr.Dropdown([], label="Checkpoints", multiselect=True, scale=2, elem_id="ev-targets")
        ui["ev_refresh"] = gr.Button("↻", scale=0, min_width=40, elem_id="ev-refresh")
    with gr.Row():
        ui["ev_data"] = gr.Textbox(label="Data file (empty: the rows the run held out)", scale=3, elem_id="ev-data")
        ui["ev_base"] = gr.Checkbox(True, label="Score the base too", elem_id="ev-base")
        ui["ev_limit"] = gr.Number(0, label="Rows (0: all)", precision=0, minimum=0)
        ui["ev_max_new"] = gr.Number(256, label="Max new tokens", precision=0, minimum=1)
    with gr.Row():
        ui["ev_btn"] = gr.Button("Evaluate", variant="primary", elem_id="ev-btn")
        ui["ev_stop"] = gr.Button("Stop", elem_id="ev-stop-btn")
    ui["ev_status"] = gr.Markdown(elem_id="ev-status")
    ui["ev_log"] = gr.Textbox(label="Evaluation log", lines=6, interactive=False, elem_id="ev-log")
    with gr.Row():
        ui["ev_stem"] = gr.Dropdown([], label="Results on", scale=2, elem_id="ev-stem")
        ui["ev_metric"] = gr.Radio(METRICS, value="exact_match", label="Plot", scale=3, elem_id="ev-metric")
    ui["ev_plot"] = gr.LinePlot(x="step", y="value", title="Score over checkpoints (base at step 0)", height=280,
                                elem_id="ev-plot")
    ui["ev_table"] = gr.Dataframe(headers=SCORE_COLUMNS, interactive=False, elem_id="ev-table")
    with gr.Row():
        ui["ev_a"] = gr.Dropdown([], label="Changed answers: target A", elem_id="ev-a")
        ui["ev_b"] = gr.Dropdown([], label="target B", elem_id="ev-b")
    ui["ev_changed_note"] = gr.Markdown(elem_id="ev-changed-note")
    ui["ev_changed"] = gr.Dataframe(headers=CHANGED_COLUMNS, interactive=False, wrap=True, elem_id="ev-changed")


def wire(ui: dict, demo) -> None:
    quiet = dict(api_visibility="private", show_progress="hidden")

    def view(run_dir, stem=None, metric="exact_match", a=None, b=None):
        """Everything the results part shows, read from disk now."""
        try:
            run_dir = workspace_run(run_dir) if run_dir else None
        except Exception:  # noqa: BLE001 - a half-typed path shows no results
            run_dir = None
        found = results(run_dir)
        stems = sorted(found)
        stem = stem if stem in stems else (stems[0] if stems else None)
        names = [r["target"] for r in _ordered(found.get(stem or "", {}))]
        a = a if a in names else (names[0] if names else None)
        b = b if b in names else (names[-1] if names else None)
        frame = scores_frame(run_dir, stem, metric or "exact_match")
        changed = changed_rows(run_dir, stem, a, b)
        note = (f"{len(changed)} rows answered differently by `{a}` and `{b}`" if a and b and a != b
                else "pick two targets to list the rows whose answers changed")
        return (gr.Dropdown(choices=stems, value=stem), gr.LinePlot(value=frame if len(frame) else None, y_title=metric or "exact_match"),
                scores_table(run_dir, stem), gr.Dropdown(choices=names, value=a), gr.Dropdown(choices=names, value=b),
                note, pd.DataFrame(changed, columns=CHANGED_COLUMNS))

    results_out = [ui["ev_stem"], ui["ev_plot"], ui["ev_table"], ui["ev_a"], ui["ev_b"], ui["ev_changed_note"],
                   ui["ev_changed"]]
    view_in = [ui["ev_run"], ui["ev_stem"], ui["ev_metric"], ui["ev_a"], ui["ev_b"]]

    def on_run(run_dir, current=None):
        ck = target_choices(run_dir)
        keep = [c for c in current or [] if c in ck]
        return gr.Dropdown(choices=ck, value=keep or ck[:1])

    def refresh(selected=None, current=None, *rest):
        dirs = run_choices()
        value = selected if selected in dirs else (dirs[0] if dirs else None)
        return (gr.Dropdown(choices=dirs, value=value), on_run(value, current), *view(value, *rest))

    outs = [ui["ev_run"], ui["ev_targets"], *results_out]
    ins = [ui["ev_run"], ui["ev_targets"], ui["ev_stem"], ui["ev_metric"], ui["ev_a"], ui["ev_b"]]
    ui["ev_refresh"].click(refresh, ins, outs, api_visibility="private")
    ui["tab_evaluate"].select(refresh, ins, outs, api_visibility="private")
    ui["ev_run"].focus(lambda: gr.Dropdown(choices=run_choices()), None, [ui["ev_run"]], **quiet)
    ui["ev_run"].change(lambda r, c: (on_run(r, c), *view(r)), [ui["ev_run"], ui["ev_targets"]],
                        [ui["ev_targets"], *results_out], api_visibility="private")
    for comp in (ui["ev_stem"], ui["ev_metric"], ui["ev_a"], ui["ev_b"]):
        comp.input(view, view_in, results_out, **quiet)

    ui["ev_btn"].click(eval_job, [ui["ev_run"], ui["ev_targets"], ui["ev_data"], ui["ev_base"], ui["ev_limit"],
                                  ui["ev_max_new"]], [ui["ev_status"], ui["ev_log"]], api_name="evaluate").then(
        view, view_in, results_out, api_visibility="private")
    ui["ev_stop"].click(stop_eval, [ui["ev_run"]], [ui["ev_status"]], api_visibility="private")

