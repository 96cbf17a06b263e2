"""What the Dataset and Template tabs show, as plain data: dataset statistics, pages of rows, a
rendered template, preview samples. It loads tokenizers, renders chat templates (untrusted code)
and parses data files (untrusted input), so the web app runs it in core.worker, a child process
with a memory limit and a time limit per request; the CLI may call it directly.

Every result is JSON-like (dicts, lists, numbers, strings): it crosses a process boundary.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

MAX_TOKENIZED = 100_000  # rows tokenised for the stats; more are sampled (said in the summary)
STATS_CHUNK = 1000  # rows per core.labels.encode_examples call
SAMPLE = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                       {"role": "user", "content": "What is the capital of France?"},
                       {"role": "assistant", "content": "Paris."},
                       {"role": "user", "content": "And of Italy?"},
                       {"role": "assistant", "content": "Rome."}]}


# ---------------------------------------------------------------- cached loading

@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float, size: int, fmt: str, columns_json: str, placeholders_json: str):
    from . import data as data_lib
    from .labels import gc_paused

    with gc_paused():  # parsing builds many small dicts: see gc_paused
        return data_lib.load_file(path, fmt, json.loads(columns_json) or None, json.loads(placeholders_json) or None)


def source_key(path: str, fmt: str = "auto", columns: dict | None = None) -> tuple:
    """The _load_cached arguments for one file (builtin:sample resolved): path, mtime, size, settings."""
    from . import data as data_lib
    from . import safe_io, tiny

    p = Path(tiny.resolve_data(path))
    try:
        st = safe_io.check_regular(p, "dataset file")
    except safe_io.FileProblem as e:
        raise data_lib.DataError(str(e)) from None
    return str(p), st.st_mtime, st.st_size, fmt or "auto", json.dumps(columns or {}, sort_keys=True), "{}"


def load_source(path: str, fmt: str = "auto", columns: dict | None = None):
    """(rows, LoadReport) for one file (builtin:sample resolved), cached by path, mtime and settings."""
    return _load_cached(*source_key(path, fmt, columns))


_build_locks: dict[tuple, threading.Lock] = {}
_build_locks_guard = threading.Lock()


def _once(key: tuple, build, *args):
    """build(*args), one build per key at a time: a call that arrives while the same thing is
    being built (the warm-up right after launch) waits for it instead of building it twice."""
    with _build_locks_guard:
        lock = _build_locks.setdefault(key, threading.Lock())
    with lock:
        return build(*args)


@functools.lru_cache(maxsize=4)
def _base_tokenizer(model: str, trust: bool):
    from . import model as model_lib

    return model_lib.load_tokenizer(model, trust_remote_code=trust)


def load_tokenizer(model: str, trust: bool = False) -> dict:
    """Load (and cache) a tokenizer, and import what the requests use: slow on a fresh worker,
    but it runs no template and reads no data file (its time limit is the long one)."""
    from . import data, templates  # noqa: F401 - imported now, outside the request's own limit

    tok = _once(("tok", model, trust), _base_tokenizer, model, bool(trust))
    return {"name": type(tok).__name__, "vocab": len(tok)}


def tokenizer_and_template(model: str, template: str, custom_jinja: str, trust: bool):
    """As training builds them: the tokenizer plus the template's missing special tokens (cached)."""
    key = (model, template, custom_jinja, trust)
    return _once(key, _tokenizer_and_template, *key)


@functools.lru_cache(maxsize=4)
def _tokenizer_and_template(model: str, template: str, custom_jinja: str, trust: bool):
    from . import templates

    base = _once(("tok", model, trust), _base_tokenizer, model, bool(trust))
    tokenizer, tmpl, _added, _ids = templates.with_template(base, template, custom_jinja, copy=True)
    return tokenizer, tmpl


def warm(model: str = "builtin:tiny") -> dict:
    """Import the tokenizer stack and load the default tokenizer (the first preview is then fast)."""
    tokenizer_and_template(model, "auto", "", False)
    return {"ok": True}


# ---------------------------------------------------------------- dataset statistics

def _token_table(rows: list[dict], tokenizer, tmpl) -> tuple[np.ndarray, np.ndarray]:
    """(untruncated length per row, trained-token mask of all rows' tokens end to end, int8) from
    core.labels.encode_examples, the batched labelling function training uses.
    Chunks run on two threads: tokenisation releases the GIL, so one chunk renders while another
    is tokenised."""
    from . import labels

    def measure(chunk):  # rows the template refuses are left out here; the preview names them
        encs = labels.encode_examples(tokenizer, tmpl, chunk, max_length=None, refused=[])
        lengths = np.fromiter((len(e.input_ids) for e in encs), dtype=np.int64, count=len(encs))
        mask = np.fromiter(itertools.chain.from_iterable(e.mask for e in encs), dtype=np.int8,
                           count=int(lengths.sum()))
        return lengths, mask

    chunks = [rows[i: i + STATS_CHUNK] for i in range(0, len(rows), STATS_CHUNK)]
    workers = min(2, os.cpu_count() or 1, len(chunks))
    if workers > 1:
        tokenizer("x", add_special_tokens=False)  # settles the backend's settings before threads share it
        with labels.gc_paused(), ThreadPoolExecutor(workers, thread_name_prefix="dataset-stats") as pool:
            parts = list(pool.map(measure, chunks))
    else:
        parts = [measure(c) for c in chunks]
    lengths = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    mask = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype=np.int8)
    return lengths, mask


@functools.lru_cache(maxsize=4)
def _token_table_cached(key: tuple, step: int, tok_key: tuple):
    rows, _ = _load_cached(*key)
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


def dataset_stats(model: str, sources: list[dict], columns: dict | None = None, template: str = "auto",
                  custom_jinja: str = "", cutoff: int = 1024, trust: bool = False) -> dict:
    """Everything the Dataset tab shows, as plain data. SOURCES: [{"path", "format", "ratio"}].
    {"sources": [{file, format, used, skipped, reasons}], "skipped": [{file,row,kind,reason}],
     "lengths": [...], "truncated", "no_trained_after_cutoff", "tokens", "trained_tokens", ...}"""
    from . import templates

    tok_key = (model or "builtin:tiny", template or "auto", custom_jinja or "", bool(trust))
    _tokenizer, tmpl = tokenizer_and_template(*tok_key)
    out = {"sources": [], "skipped": [], "lengths": [], "truncated": 0, "no_trained_after_cutoff": 0,
           "tokens": 0, "trained_tokens": 0, "rows_used": 0, "rows_skipped": 0, "cutoff": cutoff,
           "tokenized": 0, "template": tmpl.name}
    for src in sources:
        key = source_key(src["path"], src.get("format") or "auto", columns)
        rows, report = _load_cached(*key)
        name = Path(report.path).name if not src["path"].startswith("builtin:") else src["path"]
        out["sources"].append({"file": name, "format": report.format, "encoding": report.encoding,
                               "rows_total": report.rows_total, "used": report.rows_used,
                               "skipped": report.rows_skipped, "reasons": report.reasons(),
                               "ratio": src.get("ratio", 1.0)})
        out["rows_used"] += report.rows_used
        out["rows_skipped"] += report.rows_skipped
        out["skipped"] += [{"file": name, "row": s.row, "kind": s.kind, "reason": s.reason}
                           for s in report.skipped[:500]]
        step = max(1, math.ceil(len(rows) / MAX_TOKENIZED))
        try:  # cached per file and tokenizer/template: another cutoff only recounts
            lengths, mask = _token_table_cached(key, step, tok_key)
        except templates.TemplateError as e:
            raise templates.TemplateError(f"{name}: {e}") from None
        _measure(lengths, mask, cutoff, out)
        out["tokenized"] += len(lengths)
    lens = sorted(out["lengths"])
    if lens:
        out["length_mean"] = round(sum(lens) / len(lens), 1)
        out["length_p50"] = lens[len(lens) // 2]
        out["length_p90"] = lens[int(0.9 * (len(lens) - 1))]
        out["length_max"] = lens[-1]
    return out


def _row_summary(ex: dict) -> dict:
    if "text" in ex:
        return {"kind": "text", "turns": 0, "system": "", "user": "", "assistant / text": ex["text"][:200]}
    msgs = ex["messages"]
    first = lambda role: next((m["content"] for m in msgs if m["role"] == role), "")  # noqa: E731
    return {"kind": "chat", "turns": sum(m["role"] == "user" for m in msgs), "system": first("system")[:80],
            "user": first("user")[:200], "assistant / text": first("assistant")[:200]}


def rows_page(sources: list[dict], columns: dict | None = None, page: int = 1, page_size: int = 20) -> dict:
    """{"rows": [one summary dict per row of the page], "total", "pages", "page"}."""
    per_file = []
    for src in sources:
        rows, report = load_source(src["path"], src.get("format") or "auto", columns)
        per_file.append((Path(report.path).name, rows))
    total = sum(len(rows) for _, rows in per_file)
    pages = max(1, math.ceil(total / page_size))
    page = min(max(1, int(page or 1)), pages)
    start, out = (page - 1) * page_size, []
    for name, rows in per_file:
        if start >= len(rows):
            start -= len(rows)
            continue
        for i in range(start, min(len(rows), start + page_size - len(out))):
            out.append({"file": name, "#": i + 1, **_row_summary(rows[i])})
        start = 0
        if len(out) >= page_size:
            break
    return {"rows": out, "total": total, "pages": pages, "page": page}


# ---------------------------------------------------------------- templates and previews

def render_template(model: str, template: str, custom_jinja: str = "", source: dict | None = None,
                    index: int = 0, trust: bool = False) -> dict:
    """{"text", "trained_spans", "n_tokens", "n_trained", "warnings", "template", "source"} for one
    example: row INDEX of SOURCE ({"path", "format"}) when given, else a built-in two-turn chat."""
    from . import labels, templates

    tokenizer, tmpl = tokenizer_and_template(model or "builtin:tiny", template or "auto",
                                             custom_jinja if template == "custom" else "", bool(trust))
    example = SAMPLE
    if source:
        rows, _ = load_source(source["path"], source.get("format") or "auto")
        if not rows:
            raise ValueError(f"{source['path']}: no usable rows")
        example = rows[min(max(0, int(index or 0)), len(rows) - 1)]
    enc = labels.encode_example(tokenizer, tmpl, example)
    return {"template": tmpl.name, "text": enc.text,
            "trained_spans": [list(s) for s in labels.trained_spans_chars(enc)],
            "n_tokens": len(enc.input_ids), "n_trained": enc.n_trained,
            "warnings": templates.template_warnings(tokenizer, tmpl), "source": tmpl.source}


def own_template_source(model: str, trust: bool = False) -> str:
    """The tokenizer's own chat template source (to start a custom one from); chatml without one."""
    from . import templates

    try:
        tokenizer, _ = tokenizer_and_template(model or "builtin:tiny", "auto", "", bool(trust))
    except Exception:  # noqa: BLE001 - no usable auto template: fall back to chatml as a start
        return templates.NAMED["chatml"].source
    return templates._own_source(tokenizer) or templates.NAMED["chatml"].source


def _with_options(tmpl, options: dict | None):
    """The cached template with the request's template options (train_on, reasoning, system)."""
    import dataclasses

    chosen = {k: v for k, v in (options or {}).items() if v}
    return dataclasses.replace(tmpl, **chosen) if chosen else tmpl


def preview(model: str, source: dict, template: str = "auto", custom_jinja: str = "", n: int = 3,
            cutoff: int | None = 1024, trust: bool = False, options: dict | None = None) -> dict:
    """{"samples": [{"row", "text", "trained_spans", "n_tokens", "n_trained", "truncated", "notes"}],
    "refused": ["row R: reason"], "rows"}: the first N training samples of SOURCE, by the function
    `lorastudio preview` uses (core.preview.samples)."""
    from . import preview as preview_lib

    tokenizer, tmpl = tokenizer_and_template(model or "builtin:tiny", template or "auto", custom_jinja or "",
                                             bool(trust))
    rows, report = load_source(source["path"], source.get("format") or "auto")
    found, refused = preview_lib.samples(tokenizer, _with_options(tmpl, options), rows, report.used_rows, n, cutoff)
    return {"samples": found, "refused": refused, "rows": len(rows)}


# what core.worker may run for the web app, by name
FUNCTIONS = {"warm": warm, "load_tokenizer": load_tokenizer, "dataset_stats": dataset_stats, "rows_page": rows_page,
             "render_template": render_template, "own_template_source": own_template_source, "preview": preview}
