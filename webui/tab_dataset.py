"""Dataset tab: the bundled sample, a local path or an upload (copied into the workspace);
detected format with override and column mapping; several files with mix ratios; paged rows;
stats (used/skipped with reasons, token lengths against the cutoff, truncated counts); and the
highlighted preview (trained tokens), all through the core's one labelling function."""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd

from .helpers import readable, err_md, error_text, highlight_pieces, parse_columns, parse_sources, preview_highlight

FORMATS = ["auto", "openai", "sharegpt", "alpaca", "guanaco", "xtuner", "text"]
PAGE_SIZE = 20
MAX_TOKENIZED = 100_000  # rows tokenised for the stats; more are sampled (said in the summary)


# ---------------------------------------------------------------- cached loading

@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float, size: int, fmt: str, columns_json: str, placeholders_json: str):
    from core import data as data_lib
    from core.templates import gc_paused

    with gc_paused():  # parsing builds many small dicts: see gc_paused
        return data_lib.load_file(path, fmt, json.loads(columns_json) or None, json.loads(placeholders_json) or None)


def _source_key(path: str, fmt: str = "auto", columns: dict | None = None) -> tuple:
    """The _load_cached arguments for one file (builtin:sample resolved): path, mtime, size, settings."""
    from core import tiny

    real = tiny.resolve_data(readable(path))
    p = Path(real)
    if not p.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    st = p.stat()
    return str(p), st.st_mtime, st.st_size, fmt or "auto", json.dumps(columns or {}, sort_keys=True), "{}"


def load_source(path: str, fmt: str = "auto", columns: dict | None = None):
    """(rows, LoadReport) for one file (builtin:sample resolved), cached by path, mtime and settings."""
    return _load_cached(*_source_key(path, fmt, columns))


_build_locks: dict[tuple, threading.Lock] = {}
_build_locks_guard = threading.Lock()


def tokenizer_and_template(model: str, template: str, custom_jinja: str, trust: bool):
    """As training builds them: the tokenizer plus the template's missing special tokens (cached).
    A call that arrives while the same pair is being built (app.py's warm-up right after launch)
    waits for that build instead of building it a second time on the same cores."""
    key = (model, template, custom_jinja, trust)
    with _build_locks_guard:
        lock = _build_locks.setdefault(key, threading.Lock())
    with lock:
        return _tokenizer_and_template(*key)


@functools.lru_cache(maxsize=4)
def _tokenizer_and_template(model: str, template: str, custom_jinja: str, trust: bool):
    from core import model as model_lib
    from core import templates

    tokenizer = model_lib.load_tokenizer(readable(model), trust_remote_code=trust)
    tmpl = templates.resolve_template(tokenizer, template or "auto", custom_jinja or None)
    missing = templates.missing_special_tokens(tokenizer, tmpl)
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return tokenizer, tmpl


# ---------------------------------------------------------------- stats (pure data)

def _row_summary(ex: dict) -> dict:
    if "text" in ex:
        return {"kind": "text", "turns": 0, "system": "", "user": "", "assistant / text": ex["text"][:200]}
    msgs = ex["messages"]
    first = lambda role: next((m["content"] for m in msgs if m["role"] == role), "")  # noqa: E731
    return {"kind": "chat", "turns": sum(m["role"] == "user" for m in msgs), "system": first("system")[:80],
            "user": first("user")[:200], "assistant / text": first("assistant")[:200]}


STATS_CHUNK = 1000  # rows per core.templates.encode_examples call


def _token_table(rows: list[dict], tokenizer, tmpl) -> tuple[np.ndarray, np.ndarray]:
    """(untruncated length per row, trained-token mask of all rows' tokens end to end, int8) from
    core.templates.encode_examples, the batched labelling function training uses.
    Chunks run on two threads: tokenisation releases the GIL, so one chunk renders while another
    is tokenised."""
    from core import templates

    def measure(chunk):
        encs = templates.encode_examples(tokenizer, tmpl, chunk, max_length=None)
        lengths = np.fromiter((len(e.input_ids) for e in encs), dtype=np.int64, count=len(encs))
        mask = np.fromiter(itertools.chain.from_iterable(e.mask for e in encs), dtype=np.int8,
                           count=int(lengths.sum()))
        return lengths, mask

    chunks = [rows[i: i + STATS_CHUNK] for i in range(0, len(rows), STATS_CHUNK)]
    workers = min(2, os.cpu_count() or 1, len(chunks))
    if workers > 1:
        tokenizer("x", add_special_tokens=False)  # settles the backend's settings before threads share it
        with templates.gc_paused(), ThreadPoolExecutor(workers, thread_name_prefix="dataset-stats") as pool:
            parts = list(pool.map(measure, chunks))
    else:
        parts = [measure(c) for c in chunks]
    lengths = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    mask = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype=np.int8)
    return lengths, mask


@functools.lru_cache(maxsize=4)
def _token_table_cached(source_key: tuple, step: int, tok_key: tuple):
    rows, _ = _load_cached(*source_key)
    return _token_table(rows[::step], *tokenizer_and_template(*tok_key))


def _measure(lengths: np.ndarray, mask: np.ndarray, cutoff: int, out: dict) -> None:
    """Token statistics at CUTOFF into OUT: per row the figures encode_example(max_length=cutoff)
    gives (truncated, tokens, trained tokens kept); lengths untruncated for the histogram."""
    cum = np.zeros(mask.size + 1, dtype=np.int64 if mask.size >= 2**31 else np.int32)
    np.cumsum(mask, out=cum[1:])
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) if lengths.size else lengths
    kept = cum[starts + np.minimum(lengths, cutoff)] - cum[starts]
    out["lengths"] += lengths.tolist()
    out["tokens"] += int(np.minimum(lengths, cutoff).sum())
    out["trained_tokens"] += int(kept.sum())
    out["truncated"] += int((lengths > cutoff).sum())
    out["no_trained_after_cutoff"] += int((kept == 0).sum())


def dataset_stats(model: str, data: str, fmt: str = "auto", columns: str = "", template: str = "auto",
                  custom_jinja: str = "", cutoff: int = 1024, trust: bool = False) -> dict:
    """Everything the Dataset tab shows, as plain data:
    {"sources": [{file, format, used, skipped, reasons}], "skipped": [{file,row,kind,reason}],
     "lengths": [...], "truncated", "no_trained_after_cutoff", "tokens", "trained_tokens", ...}"""
    from core import templates

    cutoff = int(cutoff or 1024)
    cols = parse_columns(columns)
    tok_key = (model or "builtin:tiny", template or "auto", custom_jinja or "", bool(trust))
    tokenizer, tmpl = tokenizer_and_template(*tok_key)
    out = {"sources": [], "skipped": [], "lengths": [], "truncated": 0, "no_trained_after_cutoff": 0,
           "tokens": 0, "trained_tokens": 0, "rows_used": 0, "rows_skipped": 0, "cutoff": cutoff,
           "tokenized": 0, "template": tmpl.name}
    for src in parse_sources(data):
        key = _source_key(src["path"], src.get("format") or fmt, cols)
        rows, report = _load_cached(*key)
        name = Path(report.path).name if not src["path"].startswith("builtin:") else src["path"]
        out["sources"].append({"file": name, "format": report.format, "encoding": report.encoding,
                               "rows_total": report.rows_total, "used": report.rows_used,
                               "skipped": report.rows_skipped, "reasons": report.reasons(),
                               "ratio": src.get("ratio", 1.0)})
        out["rows_used"] += report.rows_used
        out["rows_skipped"] += report.rows_skipped
        out["skipped"] += [{"file": name, "row": s.row, "kind": s.kind, "reason": s.reason} for s in report.skipped]
        step = max(1, math.ceil(len(rows) / MAX_TOKENIZED))
        try:  # cached per file and tokenizer/template: another cutoff only recounts
            lengths, mask = _token_table_cached(key, step, tok_key)
        except templates.TemplateError as e:
            raise ValueError(f"{name}: {e}") from None
        _measure(lengths, mask, cutoff, out)
        out["tokenized"] += len(lengths)
    lens = sorted(out["lengths"])
    if lens:
        out["length_mean"] = round(sum(lens) / len(lens), 1)
        out["length_p50"] = lens[len(lens) // 2]
        out["length_p90"] = lens[int(0.9 * (len(lens) - 1))]
        out["length_max"] = lens[-1]
    return out


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
    cols = parse_columns(columns)
    all_rows = []
    for src in parse_sources(data):
        rows, report = load_source(src["path"], src.get("format") or fmt, cols)
        name = Path(report.path).name
        all_rows += [(name, i + 1, ex) for i, ex in enumerate(rows)]
    pages = max(1, math.ceil(len(all_rows) / page_size))
    page = min(max(1, int(page or 1)), pages)
    chunk = all_rows[(page - 1) * page_size: page * page_size]
    df = pd.DataFrame([{"file": f, "#": i, **_row_summary(ex)} for f, i, ex in chunk])
    return df, len(all_rows), pages


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


def page_view(data, fmt, columns, page):
    try:
        df, total, pages = rows_page(data, fmt, columns, page)
    except Exception as e:  # noqa: BLE001
        return pd.DataFrame(), err_md(e)
    page = min(max(1, int(page or 1)), pages)
    return df, f"page {page} of {pages} ({total} rows)"


def upload(path: str | None, current: str = ""):
    """Copy an uploaded file into the workspace; the dataset box gets its workspace path."""
    from core import workspace

    if not path:
        return current, ""
    try:
        dest = workspace.copy_upload(path)
    except Exception as e:  # noqa: BLE001
        return current, err_md(e)
    return str(dest), f"uploaded to `{dest}`"


def preview_view(model, data, template, custom_jinja, fmt, n, cutoff, trust):
    """Highlighted samples with the current format/template/cutoff (the core's encode_example)."""
    from core import templates

    try:
        tokenizer, tmpl = tokenizer_and_template(model or "builtin:tiny", template or "auto", custom_jinja or "",
                                                 bool(trust))
        src = parse_sources(data)[0]
        rows, _ = load_source(src["path"], src.get("format") or fmt)
        pieces = []
        for i, ex in enumerate(rows[: int(n)]):
            enc = templates.encode_example(tokenizer, tmpl, ex, max_length=int(cutoff or 1024))
            pieces.append((f"\n--- sample {i + 1} ({len(enc.input_ids)} tokens, {enc.n_trained} trained"
                           + (", truncated" if enc.truncated else "") + ") ---\n", None))
            pieces += highlight_pieces(enc.text, templates.trained_spans_chars(enc))
    except Exception as e:  # noqa: BLE001
        return [], err_md(e)
    return pieces, f"{min(int(n), len(rows))} samples rendered"


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
        ui["cutoff"] = gr.Number(value=1024, precision=0, minimum=1, label="Cutoff length (tokens)")
    ui["stats_btn"] = gr.Button("Analyze", variant="primary")
    ui["stats_md"] = gr.Markdown(elem_id="dataset-stats")
    ui["hist"] = gr.BarPlot(x="tokens", y="rows", color="where", title="Token length per sample vs cutoff",
                            x_title="tokens", y_title="rows", height=260,
                            color_map={"within cutoff": "#3b82f6", "over cutoff (truncated)": "#ef4444"})
    with gr.Accordion("Rows", open=True):
        with gr.Row():
            ui["page_prev"] = gr.Button("◀", scale=0, min_width=40)
            ui["page"] = gr.Number(value=1, precision=0, minimum=1, label="Page (Enter to go)", scale=1)
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
        btn.click(lambda p, d=delta: max(1, int(p or 1) + d), [ui["page"]], [ui["page"]],
                  api_visibility="private").then(page_view, [ui["data"], ui["fmt"], ui["columns"], ui["page"]],
                                                 [ui["rows_df"], ui["page_md"]], api_visibility="private")
    ui["upload"].upload(upload, [ui["upload"], ui["data"]], [ui["data"], ui["upload_md"]], api_name="upload")
    ui["preview_btn"].click(preview_view, [ui["model"], ui["data"], ui["template"], ui["custom_jinja"], ui["fmt"],
                                           ui["preview_n"], ui["cutoff"], ui["trust_remote_code"]],
                            [ui["preview_out"], ui["preview_status"]], api_name="preview_full")
    # the original endpoint, signature kept (tests and scripts call it): model, data, template, n
    ui["api_preview_btn"].click(preview_highlight, [ui["model"], ui["data"], ui["template"], ui["preview_n"]],
                                [ui["preview_out"], ui["preview_status"]], api_name="preview")
