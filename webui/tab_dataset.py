"""Dataset tab: the bundled sample, a local path or an upload (copied into the workspace);
detected format with override and column mapping; several files with mix ratios; paged rows;
stats (used/skipped with reasons, token lengths against the cutoff, truncated counts); and the
highlighted preview (trained tokens), all through the core's one labelling function."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd

from .helpers import (err_md, error_text, highlight_pieces, parse_columns, parse_sources, preview_highlight, readable,
                      whole)
from .histogram import histogram_html, length_histogram

FORMATS = ["auto", "openai", "sharegpt", "alpaca", "guanaco", "xtuner", "text"]
PAGE_SIZE = 20
MAX_TOKENS = 1_048_576  # core.config.MAX_TOKENS (importing core.config here would load pydantic's models early)


def _sources(data: str, fmt: str = "auto") -> list[dict]:
    """The dataset box as core sources, every path checked against the folders the app may read."""
    out = []
    for src in parse_sources(data):
        out.append({"path": readable(src["path"]), "format": src.get("format") or fmt or "auto",
                    "ratio": src.get("ratio", 1.0)})
    return out


def dataset_stats(model: str, data: str, fmt: str = "auto", columns: str = "", template: str = "auto",
                  custom_jinja: str = "", cutoff: int = 1024, trust: bool = False) -> dict:
    """Everything the Dataset tab shows, as plain data (core.analysis.dataset_stats, computed by
    core.worker: data files and templates are untrusted)."""
    from lorastudio.core import worker

    model = readable(model or "builtin:tiny")
    return worker.call("dataset_stats", tokenizer=(model, bool(trust)), model=model, sources=_sources(data, fmt),
                       columns=parse_columns(columns), template=template or "auto", custom_jinja=custom_jinja or "",
                       cutoff=whole(cutoff or 1024, "Cutoff length", 1, MAX_TOKENS), trust=bool(trust))


def rows_page(data: str, fmt: str = "auto", columns: str = "", page: int = 1, page_size: int = PAGE_SIZE):
    """(DataFrame of one page of normalised rows, total rows, pages)."""
    from lorastudio.core import worker

    r = worker.call("rows_page", sources=_sources(data, fmt), columns=parse_columns(columns),
                    page=whole(page or 1, "Page", 1, 10**12), page_size=page_size)
    return pd.DataFrame(r["rows"]), r["total"], r["pages"]


def summary_markdown(s: dict) -> str:
    lines = []
    for src in s["sources"]:
        line = (f"**{src['file']}** · format **{src['format']}** · {src['used']} rows used · "
                f"{src['skipped']} skipped" + (f" ({src['reasons']})" if src["skipped"] else ""))
        if src.get("ratio", 1.0) != 1.0:
            line += f" · mix ratio {src['ratio']}"
        lines.append(line)
    n = len(s["lengths"])
    if n:
        sampled = f" (sampled {s['tokenized']} of {s['rows_used']} rows)" if s["tokenized"] < s["rows_used"] else ""
        lines.append(f"Tokens per sample{sampled}: mean {s['length_mean']}, median {s['length_p50']}, "
                     f"p90 {s['length_p90']}, max {s['length_max']} · cutoff {s['cutoff']}")
        lines.append(f"**{s['truncated']} truncated** at the cutoff ({100 * s['truncated'] / n:.1f}%) · "
                     f"{s['no_trained_after_cutoff']} would have no trained token left · "
                     f"{s['trained_tokens']:,} trained of {s['tokens']:,} tokens "
                     f"· template {s['template']}")
    return "\n\n".join(lines)


# ---------------------------------------------------------------- handlers (api)

def stats_view(model, data, fmt, columns, template, custom_jinja, cutoff, trust) -> dict:
    """Everything one analysis shows, for the file(s) in the dataset box now: {"summary" (md),
    "histogram" (length_histogram, None on error), "skipped", "rows" (DataFrames), "page_md",
    "error" (md or None)}. Every key is set each time, so nothing of an earlier file or an earlier
    error stays on screen."""
    empty = pd.DataFrame()
    try:
        s = dataset_stats(model, data, fmt, columns, template, custom_jinja, cutoff, trust)
        rows, total, pages = rows_page(data, fmt, columns, 1)
    except Exception as e:  # noqa: BLE001
        return {"summary": err_md(e), "histogram": None, "skipped": empty, "rows": empty, "page_md": "",
                "error": err_md(e)}
    skipped = pd.DataFrame(s["skipped"][:500], columns=["file", "row", "kind", "reason"])
    return {"summary": summary_markdown(s), "histogram": length_histogram(s["lengths"], s["cutoff"]),
            "skipped": skipped, "rows": rows, "page_md": f"page 1 of {pages} ({total} rows)", "error": None}


def stats_api(model: str, data: str, fmt: str, columns: str, template: str, custom_jinja: str, cutoff: float,
              trust: bool) -> dict:
    """JSON-native twin of stats_view (api_name="dataset_stats")."""
    try:
        s = dataset_stats(model, data, fmt, columns, template, custom_jinja, cutoff, trust)
    except Exception as e:  # noqa: BLE001
        return {"error": error_text(e)}
    h = length_histogram(s["lengths"], s["cutoff"])
    out = {k: v for k, v in s.items() if k != "lengths"}
    out["summary"] = summary_markdown(s)
    out["skipped"] = s["skipped"][:500]
    out["histogram"] = {"bin_width": h["width"], "bins": h["bins"], "over_cutoff": h["over"],
                        "over_cutoff_pct": round(h["share"], 2)}
    return json.loads(json.dumps(out, default=int))


def _page_number(page) -> int:
    try:
        return whole(page or 1, "Page", 1, 10**12)
    except ValueError:
        return 1


def page_view(data, fmt, columns, page):
    try:
        df, total, pages = rows_page(data, fmt, columns, page)
    except Exception as e:  # noqa: BLE001
        return pd.DataFrame(), err_md(e)
    return df, f"page {min(_page_number(page), pages)} of {pages} ({total} rows)"


ROWS_EMPTY = "No rows yet: press **Analyze**."
SKIPPED_EMPTY = "No skipped rows."
# file, #, kind, turns, system, user, assistant / text (core.analysis.rows_page): the texts get the room
ROW_WIDTHS = {"file": "10%", "#": "5%", "kind": "6%", "turns": "6%", "system": "15%", "user": "24%",
              "assistant / text": "34%"}


def table(df: pd.DataFrame, empty: str, widths: dict | None = None):
    """A table and its empty-state line: a table with no rows is hidden (an empty gr.Dataframe
    shows placeholder columns "1 2 3"); widths by column name keep narrow columns narrow."""
    kw = {"column_widths": [widths.get(c, "auto") for c in df.columns]} if widths and len(df.columns) else {}
    return gr.Dataframe(value=df, visible=len(df) > 0, **kw), ("" if len(df) else empty)


def upload(path: str | None, current: str = ""):
    """Copy an uploaded file into the workspace; the dataset box gets its workspace path."""
    from lorastudio.core import workspace

    if not path:
        return current, ""
    try:
        dest = workspace.copy_upload(path)
    except Exception as e:  # noqa: BLE001
        return current, err_md(e)
    return str(dest), f"uploaded **{Path(dest).name}** (a copy in the workspace)"


def preview_view(model, data, template, custom_jinja, fmt, n, cutoff, trust, train_on="all", reasoning="auto",
                 system_role="auto"):
    """Highlighted samples with the current format/template/cutoff/template options, by the function
    `lorastudio preview` uses (core.preview.samples)."""
    from lorastudio.core import worker

    try:
        n = whole(n, "Samples", 1, 100)
        model = readable(model or "builtin:tiny")
        r = worker.call("preview", tokenizer=(model, bool(trust)), model=model, source=_sources(data, fmt)[0],
                        template=template or "auto", custom_jinja=custom_jinja or "", n=n,
                        cutoff=whole(cutoff or 1024, "Cutoff length", 1, MAX_TOKENS), trust=bool(trust),
                        options={"train_on": train_on, "reasoning": reasoning, "system": system_role})
    except Exception as e:  # noqa: BLE001
        return [], err_md(e)
    pieces = []
    for i, smp in enumerate(r["samples"]):
        pieces.append((f"\n--- sample {i + 1} (row {smp['row']}, {smp['n_tokens']} tokens, {smp['n_trained']} trained"
                       + (", truncated" if smp["truncated"] else "") + "".join(f"; {x}" for x in smp["notes"])
                       + ") ---\n", None))
        pieces += highlight_pieces(smp["text"], smp["trained_spans"])
    status = f"{len(r['samples'])} samples rendered"
    if r["refused"]:
        status += f"; the template refused {len(r['refused'])} rows (first: {r['refused'][0]})"
    if not r["samples"] and r["refused"]:
        return [], err_md(ValueError(f"the template refused every row ({r['refused'][0]})"))
    return pieces, status


def build(ui: dict) -> None:
    gr.Markdown("One dataset per line; `path | ratio` mixes several (ratio × usable rows), "
                "`path | ratio | format` overrides one file's format. "
                "`builtin:sample` is the bundled sample.")
    with gr.Row():
        ui["data"] = gr.Textbox(value="builtin:sample", label="Dataset (builtin:sample, a path, or upload)",
                                lines=2, scale=3)
        with gr.Column(scale=1):
            ui["upload"] = gr.UploadButton("Upload json/jsonl/csv/parquet/txt",
                                           file_types=[".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet",
                                                       ".txt"])
            ui["upload_md"] = gr.Markdown()
    with gr.Row():
        ui["fmt"] = gr.Dropdown(FORMATS, value="auto", label="Format (auto = detect)")
        ui["columns"] = gr.Textbox(label="Column mapping override (key=column, ...)",
                                   placeholder="instruction=question, output=answer")
        ui["cutoff"] = gr.Number(value=1024, precision=0, label="Cutoff length (tokens)")
    ui["stats_btn"] = gr.Button("Analyze", variant="primary")
    ui["stats_md"] = gr.Markdown(elem_id="dataset-stats")
    ui["hist"] = gr.HTML(histogram_html(None), elem_id="length-hist-box")
    with gr.Accordion("Rows", open=True):
        with gr.Row():
            ui["page_prev"] = gr.Button("◀", scale=0, min_width=40)
            ui["page"] = gr.Number(value=1, precision=0, label="Page (Enter to go)", scale=1)
            ui["page_next"] = gr.Button("▶", scale=0, min_width=40)
            ui["page_md"] = gr.Markdown()
        ui["rows_empty"] = gr.Markdown(ROWS_EMPTY)
        ui["rows_df"] = gr.Dataframe(label="Rows (normalised)", interactive=False, wrap=True, max_height=400,
                                     visible=False, elem_id="rows-df")
    with gr.Accordion("Skipped rows", open=False):
        ui["skipped_empty"] = gr.Markdown(SKIPPED_EMPTY)
        ui["skipped_df"] = gr.Dataframe(interactive=False, wrap=True, max_height=300, visible=False,
                                        column_widths=["15%", "8%", "12%", "65%"], elem_id="skipped-df")
    with gr.Accordion("Preview: rendered as training sees it", open=True):
        with gr.Row():
            ui["preview_n"] = gr.Slider(1, 20, value=3, step=1, label="Samples")
            ui["preview_btn"] = gr.Button("Preview", variant="primary")
        ui["preview_status"] = gr.Markdown()
        ui["preview_out"] = gr.HighlightedText(label="Trained tokens highlighted", combine_adjacent=True,
                                               color_map={"trained": "green"}, elem_id="preview-out")


def wire(ui: dict, demo) -> None:
    stats_in = [ui["model"], ui["data"], ui["fmt"], ui["columns"], ui["template"], ui["custom_jinja"], ui["cutoff"],
                ui["trust_remote_code"]]

    stats_outs = [ui["stats_md"], ui["hist"], ui["skipped_df"], ui["skipped_empty"], ui["rows_df"], ui["rows_empty"],
                  ui["page"], ui["page_md"], ui["preview_out"], ui["preview_status"]]

    def show(v: dict, preview_status: str = ""):
        """An analysis on screen; the preview is of the file analysed, so a preview of another file
        (or an error) is cleared."""
        keep = not v["error"] and preview_status and not preview_status.startswith("**Error:**")
        return (v["summary"], histogram_html(v["histogram"], "No histogram: the analysis failed." if v["error"]
                                             else "No rows to measure."),
                *table(v["skipped"], SKIPPED_EMPTY if not v["error"] else "No rows analysed."),
                *table(v["rows"], ROWS_EMPTY if v["error"] else "The file holds no rows.", ROW_WIDTHS),
                1, v["page_md"], *((gr.skip(), gr.skip()) if keep else ([], "")))

    def stats_ui(*a):  # stats_view's inputs, then the preview's and the upload's messages
        return show(stats_view(*a[:-2]), a[-2]) + (gr.skip() if not str(a[-1]).startswith("**Error:**") else "",)

    def after_upload(*a):  # a new file: every view follows it, the old preview goes
        return show(stats_view(*a), "")

    def stale(_data):  # the box was edited by hand: what is on screen belongs to the file before
        return ("Dataset changed: press **Analyze**.", histogram_html(None), *table(pd.DataFrame(), SKIPPED_EMPTY),
                *table(pd.DataFrame(), ROWS_EMPTY), 1, "", [], "")

    ui["stats_btn"].click(stats_ui, stats_in + [ui["preview_status"], ui["upload_md"]], stats_outs + [ui["upload_md"]],
                          api_name="dataset_analyze")
    ui["data"].input(stale, [ui["data"]], stats_outs, api_visibility="private", show_progress="hidden")
    ui["api_stats_btn"].click(stats_api, stats_in, [ui["api_json"]], api_name="dataset_stats")
    ui["page"].submit(page_view, [ui["data"], ui["fmt"], ui["columns"], ui["page"]], [ui["rows_df"], ui["page_md"]],
                      api_name="dataset_rows")
    for btn, delta in ((ui["page_prev"], -1), (ui["page_next"], 1)):
        btn.click(lambda p, d=delta: max(1, _page_number(p) + d), [ui["page"]], [ui["page"]],
                  api_visibility="private").then(page_view, [ui["data"], ui["fmt"], ui["columns"], ui["page"]],
                                                 [ui["rows_df"], ui["page_md"]], api_visibility="private")
    ui["upload"].upload(upload, [ui["upload"], ui["data"]], [ui["data"], ui["upload_md"]], api_name="upload").then(
        after_upload, stats_in, stats_outs, api_visibility="private")
    ui["preview_btn"].click(preview_view, [ui["model"], ui["data"], ui["template"], ui["custom_jinja"], ui["fmt"],
                                           ui["preview_n"], ui["cutoff"], ui["trust_remote_code"], ui["form"]["train_on"],
                                           ui["form"]["reasoning"], ui["form"]["system_role"]],
                            [ui["preview_out"], ui["preview_status"]], api_name="preview_full")
    # the original endpoint, signature kept (tests and scripts call it): model, data, template, n
    ui["api_preview_btn"].click(preview_highlight, [ui["model"], ui["data"], ui["template"], ui["preview_n"]],
                                [ui["preview_out"], ui["preview_status"]], api_name="preview")
