"""The pieces of a chat row beyond role + text: content parts, tool calls and tool results, the
`tools` a row offers the model, reasoning, and rows meant for preference training. Everything ends
in the shape `apply_chat_template` takes (Hugging Face's chat format):

    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function":
        {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    {"role": "tool", "content": "{\"temp\": 21}"}
    tools = [{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}]

Arguments become objects (OpenAI's JSON strings are parsed), because templates write them with
`tojson` and a string would be quoted twice."""

from __future__ import annotations

import json
from typing import Any

from .data_files import RowError, tname

REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")  # what data calls an answer's reasoning
MEDIA_PARTS = {"image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file"}


def _error(reason: str, kind: str, fix: str) -> RowError:
    return RowError(reason, kind, fix=fix)


def join_parts(parts: list, where: str) -> str:
    """Content parts -> one string: OpenAI's {"type": "text", "text": ...} and LLaMA-Factory's
    {"type": "text", "value": ...}. Images and other media are refused: the studio trains text."""
    texts = []
    for j, p in enumerate(parts):
        if isinstance(p, str):
            texts.append(p)
            continue
        kind = p.get("type", "text") if isinstance(p, dict) else tname(p)
        if kind in MEDIA_PARTS:
            raise _error(f"field {where}[{j}]: {kind} content; this studio trains text-only models", "media content",
                         "remove the media part (keep the text parts), use a text-only dataset, or drop the row")
        text = next((p[k] for k in ("text", "value", "content") if isinstance(p.get(k), str)), None) \
            if isinstance(p, dict) and kind == "text" else None
        if text is None:
            raise _error(f"field {where}[{j}]: unsupported content part {kind!r}", "non-text content",
                         'use text parts ({"type": "text", "text": ...}) or a plain string, or drop the row')
        texts.append(text)
    return "\n".join(texts)


def _json(value: Any, where: str, want: type) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _error(f"field {where}: not valid JSON ({e.msg} at character {e.pos})", "invalid JSON",
                         "correct the JSON (or write it as an object rather than a string), or drop the row") from None
    if not isinstance(value, want):
        raise _error(f"field {where}: expected {tname(want())}, got {tname(value)}", "wrong type",
                     f"make it {tname(want())}, or drop the row")
    return value


def _call(value: Any, where: str) -> dict:
    """One tool call (OpenAI {"function": {...}} or a bare {"name", "arguments"}) -> HF's shape."""
    value = _json(value, where, dict)
    fn = value.get("function", value)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _error(f"field {where}: a tool call needs a function name", "bad tool call",
                     'give the call a name ({"function": {"name": ..., "arguments": {...}}}), or drop the row')
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass  # arguments that aren't JSON stay text, as the data has them
    call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(value.get("id"), str):
        call["id"] = value["id"]
    return call


def tool_calls(value: Any, where: str) -> list[dict]:
    """A message's tool calls: a list of calls, or one call (ShareGPT `function_call` holds one
    JSON object, or a list of them, as a string)."""
    value = _json(value, where, (list, dict)) if isinstance(value, str) else value
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise _error(f"field {where}: empty list of tool calls", "bad tool call",
                     "list the calls, or remove the empty field")
    return [_call(c, f"{where}[{i}]" if isinstance(value, list) else where) for i, c in enumerate(calls)]


def tools(value: Any, where: str) -> list[dict] | None:
    """The `tools` column (a list, or the JSON string of one, as glaive/LLaMA-Factory ship it) ->
    HF's [{"type": "function", "function": {...}}], or None when empty."""
    if value is None or value == "" or value == []:
        return None
    items = _json(value, where, list)
    out = []
    for i, t in enumerate(items):
        if not isinstance(t, dict):
            raise _error(f"field {where}[{i}]: expected an object, got {tname(t)}", "bad tool",
                         'write each tool as an object ({"type": "function", "function": {"name": ...}}), or drop the row')
        fn = t.get("function", t) if t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _error(f"field {where}[{i}]: a tool needs a function name", "bad tool",
                         "give the tool's function a name, or drop the row")
        out.append({"type": "function", "function": fn})
    return out or None


def reasoning(message: dict, where: str) -> str | None:
    for key in REASONING_KEYS:
        value = message.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise _error(f"field {where}.{key}: expected a string, got {tname(value)}", "wrong type",
                         "make the reasoning a string, or leave it out")
        return value
    return None


def preference_kind(raw: Any) -> str | None:
    """'preference' for chosen/rejected rows (DPO, ORPO, SimPO), 'kto' for rows with a boolean
    label; they belong to preference training, not supervised fine-tuning."""
    if not isinstance(raw, dict):
        return None
    if "chosen" in raw and "rejected" in raw:
        return "preference"
    if isinstance(raw.get("label"), bool) and ("completion" in raw or "prompt" in raw):
        return "kto"
    return None


PREFERENCE_MESSAGE = {
    "preference": "rows with 'chosen' and 'rejected' answers are preference data (DPO, ORPO, SimPO): train them "
                  "under stage: dpo (or orpo, simpo), not supervised fine-tuning; for SFT use rows with a "
                  "conversation (messages/conversations) or instruction/output",
    "kto": "rows with a prompt, a completion and a true/false 'label' are KTO preference data: train them under "
           "stage: kto, not supervised fine-tuning; for SFT use rows with a conversation (messages/conversations) "
           "or instruction/output",
}
