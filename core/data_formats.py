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

from . import data_messages as parts
from .data_files import DataError, RowError, tname

FORMATS = ("openai", "sharegpt", "alpaca", "guanaco", "xtuner", "text")
DETECT_ROWS = 50  # format detection looks at this many leading rows
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user",
                "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
                "tool": "tool", "function": "tool", "ipython": "tool"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "function_call", "observation": "tool", "tool": "tool"}




def _is_guanaco(text: str) -> bool:
    return "### Human:" in text and "### Assistant:" in text


def _guess(raw: Any, col) -> str | None:
    if parts.preference_kind(raw):
        return parts.preference_kind(raw)
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
    top = votes.most_common(1)[0][0] if votes else None
    if top in parts.PREFERENCE_MESSAGE:
        raise DataError(parts.PREFERENCE_MESSAGE[top])
    if not votes:
        keys = sorted({str(k) for r in rows[:DETECT_ROWS] if isinstance(r, dict) for k in r})
        raise DataError(f"no format detected (keys seen: {', '.join(keys) or 'none'}); "
                        f"choose one of {', '.join(FORMATS)} and map columns if needed")
    return votes.most_common(1)[0][0]


def _field(raw: Any, key: str, kind: type) -> Any:
    """A required top-level field of an object row, of the given type."""
    if not isinstance(raw, dict):
        raise RowError(f"row is {tname(raw)}, expected an object", "not an object",
                       fix="write the row as a JSON object with this format's fields, or drop the row")
    if key not in raw:
        raise RowError(f"missing field '{key}'", "missing field", field=key,
                       fix=f"add '{key}' to the row, map your own column to it (the data source's columns), "
                           "or drop the row")
    value = raw[key]
    if not isinstance(value, kind):
        want = {list: "a list", str: "a string"}[kind]
        raise RowError(f"field '{key}': expected {want}, got {tname(value)}", "wrong type",
                       fix=f"make it {want}" + (" (quote a number to make it text)" if kind is str else "")
                           + ", or drop the row")
    return value


def _optional(raw: dict, key: str) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"field '{key}': expected a string, got {tname(value)}", "wrong type",
                       fix="make it a string, or leave the field out")
    return value


def _names(table: dict) -> str:
    return ", ".join(sorted(table))


def _role(value: Any, table: dict, where: str) -> str:
    if value is None:
        raise RowError(f"field {where}: missing role", "missing role",
                       fix=f"give the turn a role ({_names(table)}), or drop the row")
    role = value.strip().lower() if isinstance(value, str) else None
    if role not in table:
        raise RowError(f"field {where}: unknown role {value!r}", "unknown role",
                       fix=f"use one of {_names(table)} (ShareGPT data can map its own with the columns "
                           "user_tag, assistant_tag, system_tag), or drop the row")
    return table[role]


def _item(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise RowError(f"field {where}: expected an object, got {tname(value)}", "not an object",
                       fix="write each turn as an object with a role and its text, or drop the row")
    return value


def _text(text: Any, where: str) -> dict:
    if not isinstance(text, str):
        raise RowError(f"field {where}: expected a string, got {tname(text)}", "wrong type",
                       fix="make it a string, or drop the row")
    if not text.strip():
        raise RowError(f"field {where}: empty text", "empty text", fix="give it some text, or drop the row")
    return {"text": text}


def _turn(where: str, role: str, content: Any, **extra) -> tuple[str, dict]:
    """(where, message): `where` names the content field for messages."""
    return where, {"role": role, "content": content, **{k: v for k, v in extra.items() if v is not None}}


def _chat(turns: list[tuple[str, dict]], field: str, tools: list | None = None) -> dict:
    """(where, message) turns -> {"messages": [...], "tools"?} or RowError. Tool results follow a
    tool call; an assistant turn may hold only tool calls."""
    msgs = []
    for i, (where, m) in enumerate(turns):
        role, content = m["role"], m["content"]
        if content is None and (m.get("tool_calls") or role == "tool"):
            content = m["content"] = ""
        if not isinstance(content, str):
            raise RowError(f"field {where}: expected a string, got {tname(content)}", "non-string content",
                           fix="make the content a string (or a list of text parts), or drop the row")
        if role == "system":
            if i > 0:
                raise RowError(f"field {where}: system message is not first", "system not first",
                               fix="move it to the start of the conversation, or drop the row")
            if content.strip():  # an empty system prompt carries nothing
                msgs.append(m)
            continue
        prev = msgs[-1] if msgs else {"role": "system"}
        if role == "tool":
            if not (prev.get("tool_calls") or prev["role"] == "tool"):
                raise RowError(f"field {where}: a tool result without a tool call before it", "tool result without call",
                               fix="put the assistant turn that makes the call before it, or drop the row")
        elif role == prev["role"]:
            other = "assistant" if role == "user" else "user"
            raise RowError(f"field {where}: two consecutive {role} turns (not merged)", "consecutive turns",
                           fix=f"merge them into one turn or add the {other} turn between them, or drop the row")
        if prev["role"] == "system" and role != "user":
            raise RowError(f"field {where}: conversation starts with an {role} turn", f"starts with {role}",
                           fix="start it with a user turn (a system message may come first), or drop the row")
        if role == "assistant" and not content.strip() and not m.get("tool_calls"):
            raise RowError(f"field {where}: empty assistant turn", "empty assistant turn",
                           fix="give it a reply, or drop the row")
        msgs.append(m)
    while msgs and msgs[-1]["role"] != "assistant":  # trailing prompts have no answer to train on
        msgs.pop()
    if not msgs:
        raise RowError(f"field '{field}': no assistant turn", "no assistant turn",
                       fix="add an assistant reply to train on, or drop the row")
    return {"messages": msgs, **({"tools": tools} if tools else {})}


def _openai(raw: Any, col) -> dict:
    key, role_key, content_key = col("messages"), col("role"), col("content")
    msgs = raw if isinstance(raw, list) else _field(raw, key, list)
    turns = []
    for i, m in enumerate(msgs):
        where = f"'{key}'[{i}]"
        m = _item(m, where)
        content = m.get(content_key)
        if isinstance(content, list):
            content = parts.join_parts(content, f"{where}.{content_key}")
        turns.append((where, m.get(role_key), content, m))
    if turns and all(isinstance(r, str) and r.lower() == "pretrain" for _, r, _, _ in turns):
        if not all(isinstance(c, str) for _, _, c, _ in turns):
            raise RowError(f"field '{key}': pretrain content must be strings", "non-string content",
                           fix="make every content a string, or drop the row")
        return _text("\n".join(c for _, _, c, _ in turns), f"'{key}'")
    out = []
    for where, r, content, m in turns:
        role = _role(r, OPENAI_ROLES, f"{where}.{role_key}")
        calls = parts.tool_calls(m["tool_calls"], f"{where}.tool_calls") if m.get("tool_calls") else None
        if m.get("function_call") and role == "assistant":  # OpenAI's older single call
            calls = parts.tool_calls(m["function_call"], f"{where}.function_call")
        if role == "tool":
            extra = {k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)}
        else:
            extra = {"tool_calls": calls, "reasoning_content": parts.reasoning(m, where) if role == "assistant" else None}
        out.append(_turn(f"{where}.{content_key}", role, content, **extra))
    tools = parts.tools(raw.get(col("tools")), f"'{col('tools')}'") if isinstance(raw, dict) else None
    return _chat(out, key, tools)


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
        turns.append(_turn(f"'{col('system')}'", "system", system))
    for i, m in enumerate(conv):
        where = f"'{key}'[{i}]"
        m = _item(m, where)
        fk, vk = (from_key, value_key) if from_key in m or "role" not in m else ("role", "content")
        role, value = _role(m.get(fk), roles, f"{where}.{fk}"), m.get(vk)
        if role == "function_call":  # glaive / LLaMA-Factory: the value is the call as JSON
            turns.append(_turn(f"{where}.{vk}", "assistant", "", tool_calls=parts.tool_calls(value, f"{where}.{vk}")))
        else:
            turns.append(_turn(f"{where}.{vk}", role, value,
                               reasoning_content=parts.reasoning(m, where) if role == "assistant" else None))
    return _chat(turns, key, parts.tools(raw.get(col("tools")), f"'{col('tools')}'"))


def _alpaca(raw: Any, col) -> dict:
    ik, ok, hk = col("instruction"), col("output"), col("history")
    instruction, output = _field(raw, ik, str), _field(raw, ok, str)
    inp, system = _optional(raw, col("input")), _optional(raw, col("system"))
    history = raw.get(hk) or []
    if not isinstance(history, list):
        raise RowError(f"field '{hk}': expected a list of [user, assistant] pairs, got {tname(history)}", "wrong type",
                       fix="write it as [[user text, assistant text], ...], or leave it out")
    turns = [_turn(f"'{col('system')}'", "system", system)] if system.strip() else []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowError(f"field '{hk}'[{i}]: expected a [user, assistant] pair", "wrong type",
                           fix="write each earlier exchange as [user text, assistant text], or drop the row")
        turns += [_turn(f"'{hk}'[{i}][0]", "user", pair[0]), _turn(f"'{hk}'[{i}][1]", "assistant", pair[1])]
    # As LLaMA-Factory: the input, when present, follows the instruction on a new line.
    user = instruction + "\n" + inp if inp.strip() else instruction
    turns += [_turn(f"'{ik}'", "user", user), _turn(f"'{ok}'", "assistant", output)]
    return _chat(turns, ok)


def _guanaco(raw: Any, col) -> dict:
    key = col("text")
    text = raw if isinstance(raw, str) else _field(raw, key, str)
    pieces = re.split(r"###\s*(Human|Assistant)\s*:", text)
    # pieces = [preamble, speaker, text, speaker, text, ...]; a preamble becomes the system prompt.
    if len(pieces) < 3:
        raise RowError(f"field '{key}': no '### Human:' / '### Assistant:' markers", "not guanaco",
                       fix="mark each turn with '### Human:' or '### Assistant:', choose the text format for "
                           "plain text, or drop the row")
    turns = [_turn(f"'{key}'", "system", pieces[0].strip())] if pieces[0].strip() else []
    for j in range(1, len(pieces), 2):
        role = "user" if pieces[j] == "Human" else "assistant"
        turns.append(_turn(f"'{key}' turn {j // 2}", role, pieces[j + 1].strip()))
    return _chat(turns, key)


def _xtuner(raw: Any, col) -> dict:
    key = col("conversation")
    conv = _field(raw, key, list)
    turns = []
    for i, t in enumerate(conv):
        where = f"'{key}'[{i}]"
        t = _item(t, where)
        if "output" not in t:
            raise RowError(f"field {where}.output: missing", "missing field",
                           fix="give the turn an output (the reply to train on), or drop the row")
        if i == 0 and t.get("system"):  # XTuner reads the system prompt from the first turn only
            turns.append(_turn(f"{where}.system", "system", t["system"]))
        turns += [_turn(f"{where}.input", "user", t.get("input") or ""),
                  _turn(f"{where}.output", "assistant", t["output"])]
    # XTuner incremental pretraining: no system, every input empty -> the outputs are plain text.
    if conv and all(m["role"] != "system" and (m["role"] != "user" or m["content"] == "") for _, m in turns):
        outputs = [m["content"] for _, m in turns if m["role"] == "assistant"]
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
    return {**ex, "messages": [{**m, "content": sub(m["content"])} for m in ex["messages"]]}


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
