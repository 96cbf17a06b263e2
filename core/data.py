"""Dataset files -> normalised examples: every row becomes {"messages": [...]} or {"text": ...}.

Rows that cannot be used are skipped with a 1-based row/line number and a reason naming the field;
they are counted in the LoadReport, never dropped silently (docs/ARCHITECTURE.md, Data). Reading is
core.data_files, the row formats core.data_formats; here: one file, a mixture of files by ratio, and
the dataset's hash. A file keeps its majority kind (chat or text); rows of the other kind are
skipped as "mixed chat/text".
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from .data_files import FIX_SEP, DataError, Skipped, read_file
from .data_formats import DETECT_ROWS, FORMATS, RowError, detect_format, normalise_row
from .workspace import file_sha256

__all__ = ["DataError", "RowError", "FORMATS", "LoadReport", "detect_format", "normalise_row", "load_file",
           "load_mixture", "dataset_hash"]

MAX_MIXTURE_ROWS = 20_000_000  # rows after the ratios: far above real data, well below what memory holds


@dataclass
class LoadReport:
    path: str
    format: str
    encoding: str
    rows_total: int
    rows_used: int
    skipped: list[Skipped]
    rows_skipped: int
    used_rows: list[int] = field(default_factory=list, repr=False)  # the 1-based source row of each used example

    def reasons(self) -> str:
        counts = collections.Counter(s.kind or s.reason for s in self.skipped)
        return ", ".join(f"{n} {kind}" for kind, n in counts.most_common())

    def summary(self) -> str:
        line = f"{Path(self.path).name}: {self.format}, {self.rows_used} used, {self.rows_skipped} skipped"
        return line + (f" ({self.reasons()})" if self.skipped else "")


def load_file(path, fmt: str = "auto", columns: dict | None = None,
              placeholders: dict | None = None) -> tuple[list[dict], LoadReport]:
    path = Path(path)
    name = path.name
    rows, skipped, enc, unit = read_file(path, columns)
    rows_total = len(rows) + len(skipped)
    if rows_total == 0:
        raise DataError(f"{name}: holds no rows")
    fmt = (fmt or "auto").lower()
    if fmt == "auto":
        try:
            fmt = detect_format([r for _, r in rows], columns)
        except DataError as e:
            raise DataError(f"{name}: {e}") from None
    elif fmt not in FORMATS:
        raise DataError(f"{name}: unknown format '{fmt}' (auto or one of {', '.join(FORMATS)})")

    examples, errors = [], []
    for n, raw in rows:
        try:
            examples.append((n, normalise_row(raw, fmt, columns, placeholders)))
        except RowError as e:
            skipped.append(Skipped(n, f"{name}, {unit} {n}: {e.reason}", e.kind))
            errors.append(e)
    # One file feeds one kind of training: keep its majority kind (chat or text), report the rest.
    keep_text = 2 * sum("text" in ex for _, ex in examples) > len(examples)
    used, used_rows = [], []
    for n, ex in examples:
        if ("text" in ex) == keep_text:
            used.append(ex)
            used_rows.append(n)
        else:
            what = ("chat", "text") if keep_text else ("text", "chat")
            skipped.append(Skipped(n, f"{name}, {unit} {n}: {what[0]} row in a {what[1]} file{FIX_SEP}put the "
                                      f"{what[0]} rows in a file of their own (one file trains one kind)",
                                   "mixed chat/text"))
    skipped.sort(key=lambda s: s.row)
    report = LoadReport(str(path), fmt, enc, rows_total, len(used), skipped, len(skipped), used_rows)

    if not used:
        missing = {e.field for e in errors}
        if errors and len(errors) == len(skipped) and len(missing) == 1 and None not in missing:
            found = sorted({str(k) for _, r in rows[:DETECT_ROWS] if isinstance(r, dict) for k in r})
            raise DataError(f"{name}: missing column '{missing.pop()}' (columns found: {', '.join(found)}); map one "
                            "of yours to it (the data source's columns) or choose another format")
        raise DataError(f"{name}: no usable rows as {fmt} ({report.rows_skipped} skipped: {report.reasons()}; "
                        f"first: {skipped[0].reason})")
    return used, report


def _source(src) -> dict:
    if isinstance(src, (str, Path)):
        src = {"path": src}
    ratio = src.get("ratio")
    return {"path": str(src["path"]), "format": src.get("format") or "auto", "columns": src.get("columns") or None,
            "placeholders": src.get("placeholders") or None, "ratio": 1.0 if ratio is None else float(ratio)}


def load_mixture(sources: list[dict], seed: int = 0):
    """Load, resample by ratio, shuffle -> (datasets.Dataset with one column: "chat" (each example as
    JSON, read back with core.dataset.example_of) or "text", reports)."""
    import datasets  # lazy: importing core.data stays cheap for the CLI and UI

    sources = [_source(s) for s in sources]
    if not sources:
        raise DataError("no data sources given")
    picked, reports, kinds = [], [], {}
    for i, src in enumerate(sources):
        rows, report = load_file(src["path"], src["format"], src["columns"], src["placeholders"])
        name = Path(src["path"]).name
        if src["ratio"] < 0:
            raise DataError(f"{name}: ratio must be >= 0, got {src['ratio']}")
        n = round(src["ratio"] * len(rows))
        if len(picked) + n > MAX_MIXTURE_ROWS:
            raise DataError(f"{name}: ratio {src['ratio']:g} x {len(rows):,} rows makes the mixture more than "
                            f"{MAX_MIXTURE_ROWS:,} rows; lower the ratio (or train more epochs)")
        copies, rest = divmod(n, len(rows))
        # A stream per source, so adding a source does not change the sample drawn from another.
        rng = random.Random(f"{seed}:{i}")
        picked += rows * copies + [rows[j] for j in sorted(rng.sample(range(len(rows)), rest))]
        kinds.setdefault("text" if "text" in rows[0] else "messages", []).append(name)
        reports.append(report)
    if len(kinds) > 1:
        raise DataError(f"cannot mix chat and text data: {', '.join(kinds['messages'])} (chat) "
                        f"vs {', '.join(kinds['text'])} (text)")
    if not picked:
        raise DataError("the mixture is empty (every ratio rounds to 0 rows)")
    random.Random(seed).shuffle(picked)
    if "text" in picked[0]:
        return datasets.Dataset.from_dict({"text": [ex["text"] for ex in picked]}), reports
    # chat examples as JSON text: tool calls, tools and reasoning keep their exact shape (Arrow would
    # give every message every key, None-filled, and refuse arguments whose types differ by row)
    return datasets.Dataset.from_dict({"chat": [json.dumps(ex, ensure_ascii=False) for ex in picked]}), reports


def dataset_hash(sources) -> str:
    """sha256 over each file's bytes and its format/columns/placeholders/ratio settings, in order."""
    h = hashlib.sha256()
    for src in map(_source, sources):
        if not Path(src["path"]).is_file():
            raise DataError(f"{src['path']}: file not found")
        h.update(file_sha256(src["path"]).encode())
        settings = {k: src[k] for k in ("format", "columns", "placeholders", "ratio")}
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()
