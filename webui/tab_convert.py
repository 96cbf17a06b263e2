"""Convert tab: pick a run and a checkpoint; export the adapter, merge it into the base, or export a
GGUF for llama.cpp / Ollama (through the merge, verified against it, with a Modelfile). The work
runs in the core's child job (`python -m lorastudio.core.convert_job`, output to RUN_DIR/convert.log), reporting
convert_start / convert_end / convert_failed in RUN_DIR/metrics.jsonl, which this tab reads."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from lorastudio.core import gguf_tools, runs

from .helpers import err_md


def checkpoint_choices(run_dir: str) -> list[str]:
    """"final" (RUN_DIR/adapter) plus every checkpoint-N holding an adapter, newest first."""
    if not run_dir or not Path(run_dir).is_dir():
        return []
    p = Path(run_dir)
    steps = [c.step for c in reversed(runs.checkpoints(p)) if c.adapter]
    return (["final"] if (p / "adapter" / "adapter_config.json").exists() else []) + [f"checkpoint-{s}" for s in steps]


def _checkpoint_arg(checkpoint: str | None) -> int | None:
    if not checkpoint or checkpoint == "final":
        return None
    return int(str(checkpoint).split("-")[-1])


DTYPES = ["auto", "float32", "bfloat16", "float16"]
GGUF_TYPES = list(gguf_tools.TYPES)  # core.gguf_tools imports no model library
KINDS = ["merge", "export adapter", "GGUF"]


def convert_events(run_dir: str, since: float = 0.0, pid: int | None = None) -> list[dict]:
    """convert_* events since SINCE (of the convert child PID, when given: two jobs at once each
    read their own)."""
    events, _ = runs.read_events(run_dir)
    return [e for e in events if str(e.get("event", "")).startswith("convert_")
            and isinstance(e.get("time"), (int, float)) and e["time"] >= since
            and (pid is None or e.get("pid") in (None, pid))]


def launch_convert(run_dir: str, checkpoint: str | None, merge: bool, dtype: str = "auto", gguf: str | None = None):
    """Start the convert child (GGUF: --gguf TYPE, through the merge); returns (Popen, start time)."""
    from .helpers import workspace_run

    run_dir = workspace_run(run_dir)
    if not (Path(run_dir) / "config.yaml").exists():
        raise ValueError(f"{Path(run_dir).name} has no config.yaml")
    info = runs.status(run_dir)
    if info.get("status") in runs.ACTIVE:
        raise ValueError(f"{Path(run_dir).name} is still {info['status']}: wait for it to finish or stop it")
    choices = checkpoint_choices(run_dir)
    if not choices:
        raise ValueError(f"{Path(run_dir).name} has no adapter or checkpoint to convert")
    if checkpoint and checkpoint not in choices:
        raise ValueError(f"{Path(run_dir).name} has no {checkpoint} (it has {', '.join(choices)})")
    if (dtype or "auto") not in DTYPES:
        raise ValueError(f"merged dtype {dtype!r}: one of {', '.join(DTYPES)}")
    if gguf is not None and gguf not in GGUF_TYPES:
        raise ValueError(f"GGUF type {gguf!r}: one of {', '.join(GGUF_TYPES)}")
    cmd = [sys.executable, "-m", "lorastudio.core.convert_job", str(run_dir), "--dtype", dtype or "auto"]
    cmd += ["--gguf", gguf] if gguf else []
    ck = _checkpoint_arg(checkpoint)
    if ck is not None:
        cmd += ["--checkpoint", str(ck)]
    if merge:
        cmd.append("--merge")
    t0 = time.time()
    proc = runs.spawn(cmd, Path(run_dir) / "convert.log", cwd=run_dir)
    return proc, t0


def verification_rows(report: dict | None) -> list[dict]:
    if isinstance((report or {}).get("answers"), dict):  # a GGUF's: one row per prompt
        return [{"prompt": r.get("prompt"), "merged model": r.get("merged"), "GGUF (llama.cpp)": r.get("gguf"),
                 "identical": r.get("identical")} for r in report["answers"].get("rows") or []]
    rows = []
    for name, figs in ((report or {}).items()):
        if isinstance(figs, dict):
            rows.append({"comparison": name, "max_abs_logit_diff": figs.get("max_abs_logit_diff"),
                         "top1_agreement": figs.get("top1_agreement"), "positions": figs.get("positions"),
                         "finite": figs.get("finite")})
    return rows


def _gguf_arg(kind: str, gguf_type: str | None) -> str | None:
    return (gguf_type or "q8_0") if kind == "GGUF" else None


def convert_job(run_dir: str, checkpoint: str, kind: str, dtype: str = "auto", gguf_type: str | None = None):
    """Generator: (status md, verification df, log tail) while the child runs, then its result."""
    from .helpers import workspace_run

    merge = kind == "merge"
    gguf = _gguf_arg(kind, gguf_type)
    empty = pd.DataFrame(columns=["comparison", "max_abs_logit_diff", "top1_agreement", "positions", "finite"])
    try:
        run_dir = workspace_run(run_dir)
        proc, t0 = launch_convert(run_dir, checkpoint, merge, dtype, gguf)
    except Exception as e:  # noqa: BLE001
        yield err_md(e), empty, ""
        return
    what = f"exporting GGUF {gguf} (merge, convert, verify)" if gguf else "merging" if merge else "exporting the adapter"
    log = Path(run_dir) / "convert.log"
    while proc.poll() is None:
        yield f"⏳ {what} ({checkpoint or 'final'}) · {time.time() - t0:.0f}s", empty, _tail(log)
        time.sleep(0.5)
    yield convert_result(run_dir, t0, proc.returncode, proc.pid)


def convert_result(run_dir: str, since: float, code: int | None = None, pid: int | None = None):
    empty = pd.DataFrame(columns=["comparison", "max_abs_logit_diff", "top1_agreement", "positions", "finite"])
    log = Path(run_dir) / "convert.log"
    ev = convert_events(run_dir, since - 1, pid)
    end = next((e for e in reversed(ev) if e["event"] in ("convert_end", "convert_failed")), None)
    if end is None:
        return err_md(f"the convert job exited ({code}) without a result; see the log"), empty, _tail(log)
    if end["event"] == "convert_failed":
        return err_md(end.get("error", "convert failed")), empty, _tail(log)
    v = end.get("verification") or {}
    md = f"✅ done in {end.get('elapsed_s', 0):.1f}s: `{end['out']}`"
    if v:
        md += (f"\n\nverification **{'PASSED' if v.get('passed') else 'FAILED'}** ({v.get('criterion')})")
    md += gguf_summary(v)
    rows = verification_rows(v)
    return md, (pd.DataFrame(rows) if rows else empty), _tail(log)


def gguf_summary(v: dict) -> str:
    """The GGUF verification in words: answers, top-1 agreement, tokenization, metadata, warnings."""
    a = v.get("answers")
    if not isinstance(a, dict):
        return ""
    meta = v.get("metadata") or {}
    bad = [k for k, ok in (meta.get("checks") or {}).items() if not ok]
    tok = v.get("tokenization") or {}
    lines = [f"{a.get('identical')}/{a.get('prompts')} greedy answers identical to the merged model's; "
             f"top-1 agreement {100 * (a.get('top1_agreement') or 0):.1f}% over {a.get('positions')} tokens",
             f"chat template, BOS/EOS and end of turn: {'as the run has them' if not bad else 'DIFFER: ' + ', '.join(bad)}",
             f"llama.cpp's own tokenization of the prompts: {tok.get('same_ids')}/{tok.get('prompts')} as the run's"]
    lines += [f"⚠️ {w}" for w in v.get("warnings") or []]
    return "\n\n" + "\n".join(f"- {line}" for line in lines)


def convert_api(run_dir: str, checkpoint: str, kind: str, dtype: str, gguf_type: str = "q8_0") -> dict:
    """Blocking JSON-native twin (api_name="convert_run"): {"ok", "out", "verification", "error"}."""
    from .helpers import error_text, workspace_run

    try:
        run_dir = workspace_run(run_dir)
        proc, t0 = launch_convert(run_dir, checkpoint, kind == "merge", dtype, _gguf_arg(kind, gguf_type))
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": error_text(e)}
    proc.wait()
    ev = convert_events(run_dir, t0 - 1, proc.pid)
    end = next((e for e in reversed(ev) if e["event"] in ("convert_end", "convert_failed")), {})
    if end.get("event") != "convert_end":
        return {"ok": False, "error": end.get("error") or f"convert exited {proc.returncode}"}
    return {"ok": True, "out": end["out"], "elapsed_s": end.get("elapsed_s"), "verification": end.get("verification")}


def _tail(path: Path, n: int = 15) -> str:
    from lorastudio.core import safe_io

    return "\n".join(safe_io.tail_bytes(path, 64 * 1024).decode("utf-8", "replace").splitlines()[-n:])


def outputs_of(run_dir: str) -> list[str]:
    """Finished export/merge folders in the run (what Chat can load)."""
    if not run_dir or not Path(run_dir).is_dir():
        return []
    return sorted(str(p) for p in Path(run_dir).iterdir()
                  if p.is_dir() and p.name.startswith(("merged", "export-adapter", "gguf-"))
                  and not p.name.endswith(".partial"))


def run_choices() -> list[str]:
    """Runs with something to convert (an adapter or a checkpoint), newest first, as on disk now."""
    return [i["run_dir"] for i in runs.list_runs() if checkpoint_choices(i["run_dir"])]


def build(ui: dict) -> None:
    gr.Markdown("Export the adapter (a standard PEFT folder), merge it into the base model (a full model "
                "folder any transformers code loads), or export a GGUF for llama.cpp / Ollama (made from the merge by "
                "llama.cpp's own converter and quantizer, with a Modelfile). Runs as a child job; the merge is verified "
                "against base + adapter, the GGUF against the merge.")
    with gr.Row():
        ui["cv_run"] = gr.Dropdown([], label="Run", allow_custom_value=True, scale=3, elem_id="cv-run")
        ui["cv_ckpt"] = gr.Dropdown([], label="Checkpoint", allow_custom_value=True, scale=1, elem_id="cv-ckpt")
        ui["cv_refresh"] = gr.Button("↻", scale=0, min_width=40, elem_id="cv-refresh")
    with gr.Row():
        ui["cv_kind"] = gr.Radio(KINDS, value="merge", label="Action", elem_id="cv-kind")
        ui["cv_dtype"] = gr.Dropdown(DTYPES, value="auto", label="Merged dtype")
        ui["cv_gguf"] = gr.Dropdown(GGUF_TYPES, value="q8_0", label="GGUF type (f16: exact; q8_0: ~half; q4_k_m: ~quarter)",
                                    elem_id="cv-gguf")
        ui["cv_btn"] = gr.Button("Convert", variant="primary", elem_id="convert-btn")
    ui["cv_status"] = gr.Markdown(elem_id="convert-status")
    ui["cv_verify"] = gr.Dataframe(label="Verification (merged vs base + adapter logits; GGUF vs merged answers)",
                                   interactive=False,
                                   visible=False, elem_id="cv-verify")
    ui["cv_outputs"] = gr.JSON(label="Outputs in this run")
    ui["cv_log"] = gr.Textbox(label="Convert log", lines=8, interactive=False)
    with gr.Row(visible=False):
        ui["api_convert_btn"] = gr.Button("convert api")
        ui["api_convert_json"] = gr.JSON()


def wire(ui: dict, demo) -> None:
    def refresh(selected=None, current=None):
        dirs = run_choices()
        value = selected if selected in dirs else (dirs[0] if dirs else None)
        return (gr.Dropdown(choices=dirs, value=value), *on_run(value, current))

    # read from disk whenever a list can be seen: the tab shown, a dropdown opened, after a job
    # (save_total_limit deletes checkpoints while a run trains; a deleted one is never offered)
    outs = [ui["cv_run"], ui["cv_ckpt"], ui["cv_outputs"]]
    quiet = dict(api_visibility="private", show_progress="hidden")
    ui["cv_refresh"].click(refresh, [ui["cv_run"], ui["cv_ckpt"]], outs, api_visibility="private")
    ui["tab_convert"].select(refresh, [ui["cv_run"], ui["cv_ckpt"]], outs, api_visibility="private")
    ui["cv_run"].focus(lambda: gr.Dropdown(choices=run_choices()), None, [ui["cv_run"]], **quiet)  # typing stays
    ui["cv_ckpt"].focus(lambda r, c: on_run(r, c), [ui["cv_run"], ui["cv_ckpt"]], [ui["cv_ckpt"], ui["cv_outputs"]],
                        **quiet)
    demo.load(refresh, None, outs, api_visibility="private")

    def on_run(run_dir, current=None):
        ck = checkpoint_choices(run_dir) if run_dir else []  # read now: save_total_limit deletes old ones
        value = current if current in ck else (ck[0] if ck else None)
        return gr.Dropdown(choices=ck, value=value), outputs_of(run_dir)

    ui["cv_run"].change(on_run, [ui["cv_run"]], [ui["cv_ckpt"], ui["cv_outputs"]], api_visibility="private")

    def job(run_dir, ck, kind, dtype, gguf_type):
        kind = kind if kind in ("merge", "GGUF") else "export"
        for md, verify, log in convert_job(run_dir, ck, kind, dtype, gguf_type):
            yield md, gr.Dataframe(value=verify, visible=len(verify) > 0), log

    ui["cv_btn"].click(job, [ui["cv_run"], ui["cv_ckpt"], ui["cv_kind"], ui["cv_dtype"], ui["cv_gguf"]],
                       [ui["cv_status"], ui["cv_verify"], ui["cv_log"]], api_name="convert").then(
        on_run, [ui["cv_run"], ui["cv_ckpt"]], [ui["cv_ckpt"], ui["cv_outputs"]], api_visibility="private")
    ui["api_convert_btn"].click(convert_api, [ui["cv_run"], ui["cv_ckpt"], ui["cv_kind"], ui["cv_dtype"], ui["cv_gguf"]],
                                [ui["api_convert_json"]], api_name="convert_run")
