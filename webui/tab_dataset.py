"""Dataset tab: the bundled sample, a local path or an upload (copied into the workspace);
detected format with override and column mapping; several files with mix ratios; paged rows;
stats (used/skipped with reasons, token lengths against the cutoff, truncated counts); and the
highlighted preview (trained tokens), all through the core's one labelling function."""

from __future__ import annotations

import functools
import json
import math

import gradio as gr
import pandas as pd

from .helpers import (err_md, error_text, highlight_pieces, parse_columns, parse_sources, preview_highlight, readable,
                      whole)

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


def histogram(lengths: list[int], cutoff: int, bins: int = 30) -> tuple[pd.DataFrame, int]:
    """(DataFrame[tokens (bin start), rows, where], bin width); `where` splits each bin into the
    samples within the cutoff and those over it (truncated)."""
    if not lengths:
        return pd.DataFrame({"tokens": [], "rows": [], "where": []}), 1
    top = max(max(lengths), cutoff) + 1
    raw = top / bins
    mag = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    width = int(next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw))
    counts: dict[tuple[int, str], int] = {}
    for n in lengths:
        key = ((n // width) * width, "over cutoff (truncated)" if n > cutoff else "within cutoff")
        counts[key] = counts.get(key, 0) + 1
    keys = sorted(counts)
    return pd.DataFrame({"tokens": [k[0] for k in keys], "rows": [counts[k] for k in keys],
                         "where": [k[1] for k in keys]}), width


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

def stats_view(model, data, fmt, columns, template, custom_jinja, cutoff, trust):
    """-> (summary md, histogram df, bin width, skipped df, rows df, page info md)"""
    empty = pd.DataFrame()
    try:
        s = dataset_stats(model, data, fmt, columns, template, custom_jinja, cutoff, trust)
        rows, total, pages = rows_page(data, fmt, columns, 1)
    except Exception as e:  # noqa: BLE001
        return err_md(e), histogram([], 1)[0], 1, empty, empty, ""
    hist, width = histogram(s["lengths"], s["cutoff"])
    skipped = pd.DataFrame(s["skipped"][:500], columns=["file", "row", "kind", "reason"])
    return summary_markdown(s), hist, width, skipped, rows, f"page 1 of {pages} ({total} rows)"


def stats_api(model: str, data: str, fmt: str, columns: str, template: str, custom_jinja: str, cutoff: float,
              trust: bool) -> dict:
    """JSON-native twin of stats_view (api_name="dataset_stats")."""
    try:
        s = dataset_stats(model, data, fmt, columns, template, custom_jinja, cutoff, trust)
    except Exception as e:  # noqa: BLE001
        return {"error": error_text(e)}
    hist, width = histogram(s["lengths"], s["cutoff"])
    out = {k: v for k, v in s.items() if k != "lengths"}
    out["summary"] = summary_markdown(s)
    out["skipped"] = s["skipped"][:500]
    out["histogram"] = {"bin_width": width, "bins": hist.to_dict(orient="records")}
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


def upload(path: str | None, current: str = ""):
    """Copy an uploaded file into the workspace; the dataset box gets its workspace path."""
    from lorastudio.core import workspace

    if not path:
        return current, ""
    try:
        dest = workspace.copy_upload(path)
    except Exception as e:  # noqa: BLE001
        return current, err_md(e)
    return str(dest), f"uploaded to `{dest}`"


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
    ui["hist"] = gr.BarPlot(x="tokens", y="rows", color="where", title="Token length per sample vs cutoff",
                            x_title="tokens", y_title="rows", height=260,
                            color_map={"within cutoff": "#3b82f6", "over cutoff (truncated)": "#ef4444"})
    with gr.Accordion("Rows", open=True):
        with gr.Row():
            ui["page_prev"] = gr.Button("◀", scale=0, min_width=40)
            ui["page"] = gr.Number(value=1, precision=0, label="Page (Enter to go)", scale=1)
            ui["page_next"] = gr.Button("▶", scale=0, min_width=40)
            ui["page_md"] = gr.Markdown()
        ui["rows_df"] = gr.Dataframe(label="Rows (normalised)", interactive=False, wrap=True, max_height=400)
    with gr.Accordion("Skipped rows", open=False):
        ui["skipped_df"] = gr.Dataframe(interactive=False, wrap=True, max_height=300)
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

    @functools.wraps(stats_view)
    def stats_ui(*a):
        md, hist, width, skipped, rows, page_md = stats_view(*a)
        return md, gr.BarPlot(value=hist, x_bin=width), skipped, rows, 1, page_md

    ui["stats_btn"].click(stats_ui, stats_in, [ui["stats_md"], ui["hist"], ui["skipped_df"], ui["rows_df"],
                                               ui["page"], ui["page_md"]], api_name="dataset_analyze")
    ui["api_stats_btn"].click(stats_api, stats_in, [ui["api_json"]], api_name="dataset_stats")
    ui["page"].submit(page_view, [ui["data"], ui["fmt"], ui["columns"], ui["page"]], [ui["rows_df"], ui["page_md"]],
                      api_name="dataset_rows")
    for btn, delta in ((ui["page_prev"], -1), (ui["page_next"], 1)):
        btn.click(lambda p, d=delta: max(1, _page_number(p) + d), [ui["page"]], [ui["page"]],
                  api_visibility="private").then(page_view, [ui["data"], ui["fmt"], ui["columns"], ui["page"]],
                                                 [ui["rows_df"], ui["page_md"]], api_visibility="private")
    ui["upload"].upload(upload, [ui["upload"], ui["data"]], [ui["data"], ui["upload_md"]], api_name="upload")
    ui["preview_btn"].click(preview_view, [ui["model"], ui["data"], ui["template"], ui["custom_jinja"], ui["fmt"],
                                           ui["preview_n"], ui["cutoff"], ui["trust_remote_code"], ui["form"]["train_on"],
                                           ui["form"]["reasoning"], ui["form"]["system_role"]],
                            [ui["preview_out"], ui["preview_status"]], api_name="preview_full")
    # the original endpoint, signature kept (tests and scripts call it): model, data, template, n
    ui["api_preview_btn"].click(preview_highlight, [ui["model"], ui["data"], ui["template"], ui["preview_n"]],
                                [ui["preview_out"], ui["preview_status"]], api_name="preview")
