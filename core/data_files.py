"""Reading a dataset file into raw rows: bytes decoded (UTF-8, UTF-16, legacy encodings), JSON and
JSONL line by line (one bad line costs one row, not the file), CSV/TSV, parquet and plain text.
A row that cannot be read is skipped with its 1-based line number and a reason (core.data counts
them in its LoadReport)."""

from __future__ import annotations

import codecs
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import safe_io

EXTENSIONS = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".txt")
ROW_KEYS = ("messages", "conversations", "conversation", "instruction", "text")


class DataError(ValueError):
    """A file-level problem; the message names the file (and row/field where it applies)."""


FIX_SEP = " — "  # between what is wrong and what to do in every skip message


class RowError(ValueError):
    """One unusable row: what is wrong (naming the field) and what to do about it (fix), one
    sentence as people read it: "field 'output': empty assistant turn — give it a reply or drop
    the row". `kind` is a short category for summaries; `field` a missing top-level column."""

    def __init__(self, reason: str, kind: str = "invalid row", field: str | None = None, fix: str = "drop the row"):
        reason = f"{reason}{FIX_SEP}{fix}"
        super().__init__(reason)
        self.reason, self.kind, self.field = reason, kind, field


@dataclass
class Skipped:
    row: int  # 1-based line number (JSONL/txt) or row index (JSON list/CSV/parquet)
    reason: str  # "d.jsonl, row 3: field 'conversations'[2].from: unknown role 'bot' — use one of ... or drop the row"
    kind: str = ""  # short category used by LoadReport.summary(), e.g. "invalid JSON"


def tname(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", int: "an int", float: "a float", str: "a string",
             list: "a list", tuple: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _guess_legacy(data: bytes) -> str | None:
    import charset_normalizer

    best = charset_normalizer.from_bytes(data).best()
    if best is None:
        return None
    # Short Western-European texts score equally as cp1250/cp1252/cp1257...; ties go to cp1252
    # (a superset of latin-1's printable range), which is by far the most common of them.
    west = charset_normalizer.from_bytes(data, cp_isolation=["cp1252"]).best()
    if west is not None and west.chaos <= best.chaos and west.coherence >= best.coherence:
        return "cp1252"
    return best.encoding


def _decode(path: Path, data: bytes) -> tuple[str, str]:
    binary = DataError(f"{path.name}: looks binary, not a text data file")
    enc = None
    # utf-32 BOMs first: the utf-32-le BOM starts with the utf-16-le one.
    for bom, name in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                      (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            enc = name
            break
    if enc is None and b"\x00" in data:
        # BOM-less UTF-16 of mostly-ASCII text has a NUL in every other byte; other NULs mean binary.
        half = len(data) // 2
        if data[1::2].count(0) > 0.3 * half and data[0::2].count(0) == 0:
            enc = "utf-16-le"
        elif data[0::2].count(0) > 0.3 * half and data[1::2].count(0) == 0:
            enc = "utf-16-be"
        else:
            raise binary
    if enc is None:
        try:
            data.decode("utf-8")
            enc = "utf-8"
        except UnicodeDecodeError:
            enc = _guess_legacy(data)
    if enc is None:
        raise binary
    try:
        text = data.decode(enc)
    except (UnicodeDecodeError, LookupError):
        raise binary from None
    sample = text[:65536]
    if len(re.findall(r"[\x00-\x08\x0e-\x1f]", sample)) > 0.01 * len(sample):
        raise binary
    return text, enc


def _first_line_is_json(lines: list[str]) -> bool:
    first = next((line for line in lines if line.strip()), "")
    try:
        return isinstance(json.loads(first), (dict, list))
    except (ValueError, RecursionError):
        return False


def _rows_in(data: Any, name: str, columns: dict | None) -> list:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        known = set(ROW_KEYS) | {str(v) for v in (columns or {}).values()}
        if known & set(data):
            return [data]  # a single row saved as one object
        for value in data.values():
            if isinstance(value, list):
                return value  # a wrapper such as {"data": [...]}
    raise DataError(f"{name}: top-level JSON is {tname(data)}, expected a list of rows or an object holding one")


def read_file(path, columns: dict | None = None) -> tuple[list[tuple[int, Any]], list[Skipped], str, str]:
    """read_rows() plus the row unit ("line" or "row") used in skip reasons."""
    path = Path(path)
    name, ext = path.name, path.suffix.lower()
    if ext not in EXTENSIONS:
        raise DataError(f"{name}: unsupported file type '{ext or '(none)'}' (supported: {', '.join(EXTENSIONS)})")
    try:
        safe_io.check_regular(path, "data file")
    except safe_io.FileProblem as e:
        raise DataError(str(e)) from None
    if path.stat().st_size == 0:
        raise DataError(f"{name}: file is empty")

    if ext == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()  # plain lists/dicts, unlike pandas' numpy arrays
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{name}: not a readable parquet file ({e})") from None
        return [(i + 1, r) for i, r in enumerate(rows)], [], "parquet", "row"

    try:
        raw = safe_io.read_bytes(path, None, "data file")
    except safe_io.FileProblem as e:
        raise DataError(str(e)) from None
    text, enc = _decode(path, raw)
    if not text.strip():
        raise DataError(f"{name}: file is empty")

    if ext in (".csv", ".tsv"):
        import pandas as pd

        try:  # dtype=str + keep_default_na=False: "NA", "null", "007" stay the strings they are
            df = pd.read_csv(io.StringIO(text), sep="\t" if ext == ".tsv" else ",", dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, ValueError) as e:
            raise DataError(f"{name}: cannot parse {ext[1:].upper()} ({e})") from None
        return [(i + 1, r) for i, r in enumerate(df.to_dict("records"))], [], enc, "row"

    if ext == ".txt":
        # Paragraphs (blank-line separated) are rows; a file without blank lines has one row per line.
        lines = text.splitlines()
        paragraphs = any(not line.strip() for line in text.strip().splitlines())
        rows, buf = [], []
        for n, line in enumerate(lines + [""], 1):
            if line.strip():
                buf.append((n, line))
                if paragraphs:
                    continue
            if buf:
                rows.append((buf[0][0], "\n".join(t for _, t in buf).strip()))
                buf = []
        return rows, [], enc, "line"

    # JSON / JSON Lines. Split on "\n" only: str.splitlines() would also split on U+2028, which is
    # legal unescaped inside JSON strings.
    lines = [line.rstrip("\r") for line in text.split("\n")]
    err: Exception | None = None
    if ext == ".json" or not _first_line_is_json(lines):
        try:
            return [(i + 1, r) for i, r in enumerate(_rows_in(json.loads(text), name, columns))], [], enc, "row"
        except json.JSONDecodeError as e:
            err = e
        except RecursionError:
            err = RecursionError()
    if ext == ".json" and not _first_line_is_json(lines):  # not JSON Lines saved as .json either
        if isinstance(err, json.JSONDecodeError):
            raise DataError(f"{name}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg})")
        raise DataError(f"{name}: JSON is nested too deeply to read")
    rows, skipped = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            skipped.append(Skipped(n, f"{name}, line {n}: invalid JSON ({e.msg}: column {e.colno}){FIX_SEP}"
                                      "correct the JSON on that line or delete the line", "invalid JSON"))
        except RecursionError:
            skipped.append(Skipped(n, f"{name}, line {n}: JSON nested too deeply{FIX_SEP}flatten the row or "
                                      "delete the line", "nested too deeply"))
    return rows, skipped, enc, "line"


def read_rows(path) -> tuple[list[tuple[int, Any]], list[Skipped], str]:
    """Raw rows with their 1-based row numbers, skipped unparsable lines, detected encoding."""
    rows, skipped, enc, _ = read_file(path)
    return rows, skipped, enc
