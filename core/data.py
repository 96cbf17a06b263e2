"""Dataset files -> normalised examples: every row becomes {"messages": [...]} or {"text": ...}.

Rows that cannot be used are skipped with a 1-based row/line number and a reason naming the field;
they are counted in the LoadReport, never dropped silently (docs/ARCHITECTURE.md, Data).

Decisions worth knowing:
- JSON/JSONL are parsed here line by line (not by an Arrow reader) so one bad line costs one row,
  not the whole file.
- Content must already be a string: an int `output` (e.g. a parquet int column) is a RowError naming
  the field, not silently coerced, because a numeric answer column is usually a mapping mistake.
- Consecutive user (or assistant) turns are a RowError, not merged: merging changes what is trained.
- XTuner "incremental" data ({"conversation": [{"input": "", "output": T}]}, every input empty, no
  system) is pretraining text, as in XTuner: it becomes {"text": T}. Likewise an openai-style row
  whose messages all have role "pretrain" becomes {"text": ...}. A file keeps its majority kind
  (chat or text); rows of the other kind are skipped as "mixed chat/text".
- Unfilled {{placeholders}} are left as they are.
"""

from __future__ import annotations

import codecs
import collections
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import safe_io
from .workspace import file_sha256

FORMATS = ("openai", "sharegpt", "alpaca", "guanaco", "xtuner", "text")
EXTENSIONS = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".txt")
DETECT_ROWS = 50  # format detection looks at this many leading rows
MAX_MIXTURE_ROWS = 20_000_000  # rows after the ratios: far above real data, well below what memory holds
ROW_KEYS = ("messages", "conversations", "conversation", "instruction", "text")

# openai-style rows come from many exporters, so common aliases are accepted there.
OPENAI_ROLES = {"system": "system", "user": "user", "human": "user",
                "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """A file-level problem; the message names the file (and row/field where it applies)."""


class RowError(ValueError):
    """One unusable row. `kind` is a short category for summaries; `field` a missing top-level column."""

    def __init__(self, reason: str, kind: str = "invalid row", field: str | None = None):
        super().__init__(reason)
        self.reason, self.kind, self.field = reason, kind, field


@dataclass
class Skipped:
    row: int  # 1-based line number (JSONL/txt) or row index (JSON list/CSV/parquet)
    reason: str  # "line 7: invalid JSON (...)" / "row 3: field 'conversations'[2].from: unknown role 'bot'"
    kind: str = ""  # short category used by LoadReport.summary(), e.g. "invalid JSON"


@dataclass
class LoadReport:
    path: str
    format: str
    encoding: str
    rows_total: int
    rows_used: int
    skipped: list[Skipped]
    rows_skipped: int

    def reasons(self) -> str:
        counts = collections.Counter(s.kind or s.reason for s in self.skipped)
        return ", ".join(f"{n} {kind}" for kind, n in counts.most_common())

    def summary(self) -> str:
        line = f"{Path(self.path).name}: {self.format}, {self.rows_used} used, {self.rows_skipped} skipped"
        return line + (f" ({self.reasons()})" if self.skipped else "")


# ----------------------------------------------------------------------------- reading

def _tname(value: Any) -> str:
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
    raise DataError(f"{name}: top-level JSON is {_tname(data)}, expected a list of rows or an object holding one")


def _read(path, columns: dict | None = None) -> tuple[list[tuple[int, Any]], list[Skipped], str, str]:
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
            skipped.append(Skipped(n, f"line {n}: invalid JSON ({e.msg}: column {e.colno})", "invalid JSON"))
        except RecursionError:
            skipped.append(Skipped(n, f"line {n}: JSON nested too deeply", "nested too deeply"))
    return rows, skipped, enc, "line"


def read_rows(path) -> tuple[list[tuple[int, Any]], list[Skipped], str]:
    """Raw rows with their 1-based row numbers, skipped unparsable lines, detected encoding."""
    rows, skipped, enc, _ = _read(path)
    return rows, skipped, enc


# ----------------------------------------------------------------------------- formats

def _is_guanaco(text: str) -> bool:
    return "### Human:" in text and "### Assistant:" in text


def _guess(raw: Any, col) -> str | None:
    if isinstance(raw, list):
        return "openai" if raw and all(isinstance(m, dict) and "role" in m for m in raw) else None
    if isinstance(raw, str):
        return "guanaco" if _is_guanaco(raw) else "text"
    if not isinstance(raw, dict):
        return None
    if isinstance(raw.get(col("messages")), list):
        return "openai"
    if isinstance(raw.get(col("conversations")), list):
        return "sharegpt"
    if isinstance(raw.get(col("conversation")), list):
        return "xtuner"
    if col("instruction") in raw:  # output not required here, so a missing one is reported by name
        return "alpaca"
    if isinstance(raw.get(col("text")), str):
        return "guanaco" if _is_guanaco(raw[col("text")]) else "text"
    return None


def detect_format(rows: list[Any], columns: dict | None = None) -> str:
    """Majority vote of the first DETECT_ROWS rows; raises DataError when nothing is recognised."""
    col = lambda key: (columns or {}).get(key, key)  # noqa: E731
    votes = collections.Counter(_guess(r, col) for r in rows[:DETECT_ROWS])
    votes.pop(None, None)
    if not votes:
        keys = sorted({str(k) for r in rows[:DETECT_ROWS] if isinstance(r, dict) for k in r})
        raise DataError(f"no format detected (keys seen: {', '.join(keys) or 'none'}); "
                        f"choose one of {', '.join(FORMATS)} and map columns if needed")
    return votes.most_common(1)[0][0]


def _field(raw: Any, key: str, kind: type) -> Any:
    """A required top-level field of an object row, of the given type."""
    if not isinstance(raw, dict):
        raise RowError(f"row is {_tname(raw)}, expected an object", "not an object")
    if key not in raw:
        raise RowError(f"missing field '{key}'", "missing field", field=key)
    value = raw[key]
    if not isinstance(value, kind):
        want = {list: "a list", str: "a string"}[kind]
        raise RowError(f"field '{key}': expected {want}, got {_tname(value)}", "wrong type")
    return value


def _optional(raw: dict, key: str) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"field '{key}': expected a string, got {_tname(value)}", "wrong type")
    return value


def _role(value: Any, table: dict, where: str) -> str:
    if value is None:
        raise RowError(f"field {where}: missing role", "missing role")
    role = value.strip().lower() if isinstance(value, str) else None
    if role not in table:
        raise RowError(f"field {where}: unknown role {value!r}", "unknown role")
    return table[role]


def _item(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise RowError(f"field {where}: expected an object, got {_tname(value)}", "not an object")
    return value


def _text(text: Any, where: str) -> dict:
    if not isinstance(text, str):
        raise RowError(f"field {where}: expected a string, got {_tname(text)}", "wrong type")
    if not text.strip():
        raise RowError(f"field {where}: empty text", "empty text")
    return {"text": text}


def _chat(turns: list[tuple[str, str, Any]], field: str) -> dict:
    """(where, role, content) turns -> {"messages": [...]} or RowError. `where` names the content field."""
    msgs = []
    for i, (where, role, content) in enumerate(turns):
        if not isinstance(content, str):
            raise RowError(f"field {where}: expected a string, got {_tname(content)}", "non-string content")
        if role == "system":
            if i > 0:
                raise RowError(f"field {where}: system message is not first", "system not first")
            if content.strip():  # an empty system prompt carries nothing
                msgs.append({"role": "system", "content": content})
            continue
        prev = msgs[-1]["role"] if msgs else "system"
        if role == prev:
            raise RowError(f"field {where}: two consecutive {role} turns (not merged)", "consecutive turns")
        if prev == "system" and role == "assistant":
            raise RowError(f"field {where}: conversation starts with an assistant turn", "starts with assistant")
        if role == "assistant" and not content.strip():
            raise RowError(f"field {where}: empty assistant turn", "empty assistant turn")
        msgs.append({"role": role, "content": content})
    while msgs and msgs[-1]["role"] != "assistant":  # trailing prompts have no answer to train on
        msgs.pop()
    if not msgs:
        raise RowError(f"field '{field}': no assistant turn", "no assistant turn")
    return {"messages": msgs}


def _join_parts(parts: list, where: str) -> str:
    """OpenAI content parts [{"type": "text", "text": ...}] -> one string (text parts only)."""
    texts = []
    for j, p in enumerate(parts):
        if isinstance(p, str):
            texts.append(p)
        elif isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str):
            texts.append(p["text"])
        else:
            kind = p.get("type") if isinstance(p, dict) else _tname(p)
            raise RowError(f"field {where}[{j}]: unsupported content part {kind!r}", "non-text content")
    return "\n".join(texts)


def _openai(raw: Any, col) -> dict:
    key, role_key, content_key = col("messages"), col("role"), col("content")
    msgs = raw if isinstance(raw, list) else _field(raw, key, list)
    turns = []
    for i, m in enumerate(msgs):
        where = f"'{key}'[{i}]"
        m = _item(m, where)
        content = m.get(content_key)
        if isinstance(content, list):
            content = _join_parts(content, f"{where}.{content_key}")
        turns.append((where, m.get(role_key), content))
    if turns and all(isinstance(r, str) and r.lower() == "pretrain" for _, r, _ in turns):
        if not all(isinstance(c, str) for _, _, c in turns):
            raise RowError(f"field '{key}': pretrain content must be strings", "non-string content")
        return _text("\n".join(c for _, _, c in turns), f"'{key}'")
    return _chat([(f"{w}.{content_key}", _role(r, OPENAI_ROLES, f"{w}.{role_key}"), c) for w, r, c in turns], key)


def _sharegpt(raw: Any, col, columns: dict) -> dict:
    key, from_key, value_key = col("conversations"), col("from"), col("value")
    conv = _field(raw, key, list)
    roles = dict(SHAREGPT_ROLES)
    for tag, role in (("user_tag", "user"), ("assistant_tag", "assistant"), ("system_tag", "system")):
        if columns.get(tag):
            roles[str(columns[tag]).strip().lower()] = role
    turns = []
    system = _optional(raw, col("system"))
    if system.strip():
        turns.append((f"'{col('system')}'", "system", system))
    for i, m in enumerate(conv):
        where = f"'{key}'[{i}]"
        m = _item(m, where)
        fk, vk = (from_key, value_key) if from_key in m or "role" not in m else ("role", "content")
        turns.append((f"{where}.{vk}", _role(m.get(fk), roles, f"{where}.{fk}"), m.get(vk)))
    return _chat(turns, key)


def _alpaca(raw: Any, col) -> dict:
    ik, ok, hk = col("instruction"), col("output"), col("history")
    instruction, output = _field(raw, ik, str), _field(raw, ok, str)
    inp, system = _optional(raw, col("input")), _optional(raw, col("system"))
    history = raw.get(hk) or []
    if not isinstance(history, list):
        raise RowError(f"field '{hk}': expected a list of [user, assistant] pairs, got {_tname(history)}", "wrong type")
    turns = [(f"'{col('system')}'", "system", system)] if system.strip() else []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowError(f"field '{hk}'[{i}]: expected a [user, assistant] pair", "wrong type")
        turns += [(f"'{hk}'[{i}][0]", "user", pair[0]), (f"'{hk}'[{i}][1]", "assistant", pair[1])]
    # As LLaMA-Factory: the input, when present, follows the instruction on a new line.
    user = instruction + "\n" + inp if inp.strip() else instruction
    turns += [(f"'{ik}'", "user", user), (f"'{ok}'", "assistant", output)]
    return _chat(turns, ok)


def _guanaco(raw: Any, col) -> dict:
    key = col("text")
    text = raw if isinstance(raw, str) else _field(raw, key, str)
    parts = re.split(r"###\s*(Human|Assistant)\s*:", text)
    # parts = [preamble, speaker, text, speaker, text, ...]; a preamble becomes the system prompt.
    if len(parts) < 3:
        raise RowError(f"field '{key}': no '### Human:' / '### Assistant:' markers", "not guanaco")
    turns = [(f"'{key}'", "system", parts[0].strip())] if parts[0].strip() else []
    for j in range(1, len(parts), 2):
        role = "user" if parts[j] == "Human" else "assistant"
        turns.append((f"'{key}' turn {j // 2}", role, parts[j + 1].strip()))
    return _chat(turns, key)


def _xtuner(raw: Any, col) -> dict:
    key = col("conversation")
    conv = _field(raw, key, list)
    turns = []
    for i, t in enumerate(conv):
        where = f"'{key}'[{i}]"
        t = _item(t, where)
        if "output" not in t:
            raise RowError(f"field {where}.output: missing", "missing field")
        if i == 0 and t.get("system"):  # XTuner reads the system prompt from the first turn only
            turns.append((f"{where}.system", "system", t["system"]))
        turns += [(f"{where}.input", "user", t.get("input") or ""), (f"{where}.output", "assistant", t["output"])]
    # XTuner incremental pretraining: no system, every input empty -> the outputs are plain text.
    if conv and all(r != "system" and (r != "user" or c == "") for _, r, c in turns):
        outputs = [c for _, r, c in turns if r == "assistant"]
        if all(isinstance(c, str) for c in outputs):
            return _text("\n".join(outputs), f"'{key}'")
    return _chat(turns, key)


def _fill(ex: dict, placeholders: dict | None) -> dict:
    if not placeholders:
        return ex

    def sub(s: str) -> str:
        for k, v in placeholders.items():
            s = s.replace("{{" + str(k) + "}}", str(v))
        return s

    if "text" in ex:
        return {"text": sub(ex["text"])}
    return {"messages": [{"role": m["role"], "content": sub(m["content"])} for m in ex["messages"]]}


def normalise_row(raw: Any, fmt: str, columns: dict | None = None, placeholders: dict | None = None) -> dict:
    """One raw row -> {"messages": [...]} or {"text": ...}; RowError(reason naming the field) otherwise."""
    columns = columns or {}
    col = lambda key: columns.get(key, key)  # noqa: E731  canonical name -> the file's column name
    if fmt == "openai":
        ex = _openai(raw, col)
    elif fmt == "sharegpt":
        ex = _sharegpt(raw, col, columns)
    elif fmt == "alpaca":
        ex = _alpaca(raw, col)
    elif fmt == "guanaco":
        ex = _guanaco(raw, col)
    elif fmt == "xtuner":
        ex = _xtuner(raw, col)
    elif fmt == "text":
        ex = _text(raw, "'text'") if isinstance(raw, str) else _text(_field(raw, col("text"), str), f"'{col('text')}'")
    else:
        raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    return _fill(ex, placeholders)


# ----------------------------------------------------------------------------- files and mixtures

def load_file(path, fmt: str = "auto", columns: dict | None = None,
              placeholders: dict | None = None) -> tuple[list[dict], LoadReport]:
    path = Path(path)
    name = path.name
    rows, skipped, enc, unit = _read(path, columns)
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
            skipped.append(Skipped(n, f"{unit} {n}: {e.reason}", e.kind))
            errors.append(e)
    # One file feeds one kind of training: keep its majority kind (chat or text), report the rest.
    keep_text = 2 * sum("text" in ex for _, ex in examples) > len(examples)
    used = []
    for n, ex in examples:
        if ("text" in ex) == keep_text:
            used.append(ex)
        else:
            what = ("chat", "text") if keep_text else ("text", "chat")
            skipped.append(Skipped(n, f"{unit} {n}: {what[0]} row in a {what[1]} file", "mixed chat/text"))
    skipped.sort(key=lambda s: s.row)
    report = LoadReport(str(path), fmt, enc, rows_total, len(used), skipped, len(skipped))

    if not used:
        missing = {e.field for e in errors}
        if errors and len(errors) == len(skipped) and len(missing) == 1 and None not in missing:
            found = sorted({str(k) for _, r in rows[:DETECT_ROWS] if isinstance(r, dict) for k in r})
            raise DataError(f"{name}: missing column '{missing.pop()}' (columns found: {', '.join(found)})")
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
    """Load, resample by ratio, shuffle -> (datasets.Dataset with one column "messages" or "text", reports)."""
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
    return datasets.Dataset.from_list(picked), reports


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
