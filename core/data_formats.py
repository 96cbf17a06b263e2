"""The row formats (openai, sharegpt, alpaca, guanaco, xtuner, text): detecting a file's format
and normalising one raw row to {"messages": [...]} or {"text": ...}, or a RowError naming the field.

- Content must already be a string: an int `output` (e.g. a parquet int column) is a RowError naming
  the field, not silently coerced, because a numeric answer column is usually a mapping mistake.
- Consecutive user (or assistant) turns are a RowError, not merged: merging changes what is trained.
- XTuner "incremental" data ({"conversation": [{"input": "", "output": T}]}, every input empty, no
  system) is pretraining text, as in XTuner: it becomes {"text": T}. Likewise an openai-style row
  whose messages all have role "pretrain" becomes {"text": ...}.
- Unfilled {{placeholders}} are left as they are.
"""

from __future__ import annotations

import collections
import re
from typing import Any

from .data_files import DataError, tname

FORMATS = ("openai", "sharegpt", "alpaca", "guanaco", "xtuner", "text")
DETECT_ROWS = 50  # format detection looks at this many leading rows
OPENAI_ROLES = {"system": "system", "user": "user", "human": "user",
                "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class RowError(ValueError):
    """One unusable row. `kind` is a short category for summaries; `field` a missing top-level column."""

    def __init__(self, reason: str, kind: str = "invalid row", field: str | None = None):
        super().__init__(reason)
        self.reason, self.kind, self.field = reason, kind, field


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
        raise RowError(f"row is {tname(raw)}, expected an object", "not an object")
    if key not in raw:
        raise RowError(f"missing field '{key}'", "missing field", field=key)
    value = raw[key]
    if not isinstance(value, kind):
        want = {list: "a list", str: "a string"}[kind]
        raise RowError(f"field '{key}': expected {want}, got {tname(value)}", "wrong type")
    return value


def _optional(raw: dict, key: str) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"field '{key}': expected a string, got {tname(value)}", "wrong type")
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
        raise RowError(f"field {where}: expected an object, got {tname(value)}", "not an object")
    return value


def _text(text: Any, where: str) -> dict:
    if not isinstance(text, str):
        raise RowError(f"field {where}: expected a string, got {tname(text)}", "wrong type")
    if not text.strip():
        raise RowError(f"field {where}: empty text", "empty text")
    return {"text": text}


def _chat(turns: list[tuple[str, str, Any]], field: str) -> dict:
    """(where, role, content) turns -> {"messages": [...]} or RowError. `where` names the content field."""
    msgs = []
    for i, (where, role, content) in enumerate(turns):
        if not isinstance(content, str):
            raise RowError(f"field {where}: expected a string, got {tname(content)}", "non-string content")
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
            kind = p.get("type") if isinstance(p, dict) else tname(p)
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
        raise RowError(f"field '{hk}': expected a list of [user, assistant] pairs, got {tname(history)}", "wrong type")
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
