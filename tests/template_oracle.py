"""What a chat template should render and train, worked out independently of core: the text comes
from transformers' own `apply_chat_template`, the trained spans from prefix diffs of those renders
and the end-of-turn string a corpus entry names. Used by tests/test_template_corpus.py (the
corpus in tests/fixtures/chat_templates) and bench/template_corpus.py (any corpus, through
`lorastudio preview --json`)."""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                   "required": ["city"]}}}]
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
U1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "Paris is the capital of France."}
U2 = {"role": "user", "content": "And which river runs through it?"}
A2 = {"role": "assistant", "content": "The Seine runs through Paris."}
CALL = {"role": "assistant", "content": "", "tool_calls": [  # ids of 9 characters, as Mistral's templates want
    {"id": "call0wx7a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
RESULT = {"role": "tool", "tool_call_id": "call0wx7a", "name": "get_weather", "content": "{\"temperature_c\": 21}"}
A_TOOL = {"role": "assistant", "content": "It is 21 degrees in Paris."}

SHAPES = {
    "single": ([U1, A1], None),
    "system": ([SYSTEM, U1, A1], None),
    "multi": ([U1, A1, U2, A2], None),
    "multi_system": ([SYSTEM, U1, A1, U2, A2], None),
    "tools": ([U1, CALL, RESULT, A_TOOL], TOOLS),
}
FROZEN = dt.datetime(2026, 7, 26, 12, 0, 0)  # templates that stamp today's date see this one


class _FrozenDatetime(dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return FROZEN if tz is None else FROZEN.replace(tzinfo=tz)


def freeze_dates(monkeypatch) -> None:
    """strftime_now() gives FROZEN in transformers' renderer and in the project's sandbox."""
    import transformers.utils.chat_template_utils as hf

    from lorastudio.core import sandbox

    monkeypatch.setattr(hf, "datetime", _FrozenDatetime, raising=False)
    monkeypatch.setattr(sandbox, "datetime", _FrozenDatetime)


def corpus(folder: Path) -> dict[str, dict]:
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    for slug, entry in index.items():
        entry["source_text"] = (folder / f"{slug}.jinja").read_text(encoding="utf-8")
    return index


def shapes_for(entry: dict) -> list[str]:
    return [s for s in SHAPES if s != "tools" or entry.get("tools")]


def tokenizer_for(base, entry: dict):
    """A copy of BASE that carries the entry's template and its bos/eos tokens."""
    tok = copy.deepcopy(base)
    specials = {k: entry[k] for k in ("bos", "eos") if entry.get(k)}
    tok.add_special_tokens({f"{k}_token": v for k, v in specials.items()})
    ends = [t for t in eots(entry) if t not in specials.values()]
    if ends:
        tok.add_special_tokens({"additional_special_tokens": ends})
    tok.chat_template = entry["source_text"]
    return tok


def eots(entry: dict) -> list[str]:
    """The strings that end an answer: the entry's "eot", a list where the last answer and the
    others end differently (gpt-oss: <|return|> and <|end|>)."""
    eot = entry.get("eot")
    return [eot] if isinstance(eot, str) else list(eot or [])


def _apply(tok, messages, tools, generation_prompt=False) -> str:
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def _trim(text, s, e):
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


def _lcp(a: str, b: str) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def expected_spans(tok, messages, tools, trained: list[int], ends: list[str], text: str) -> list[tuple[int, int]]:
    """Answer i = apply(messages[:i+1]) minus apply(messages[:i], generation prompt), trimmed, and
    the end-of-turn string right after it when the template writes one there. Where the render up
    to answer i is not a prefix of TEXT (a template that renders the last turn its own way), the
    answer ends where its own text ends in TEXT."""
    spans = []
    for i in trained:
        prompt, upto = _apply(tok, messages[:i], tools, True), _apply(tok, messages[: i + 1], tools)
        start = len(prompt) if text.startswith(prompt) else _lcp(prompt, text)
        end = len(upto)
        if not text.startswith(upto):
            content = messages[i]["content"] or messages[i]["tool_calls"][0]["function"]["name"]
            end = text.find(content, start) + len(content)
        s, e = _trim(text, start, end)
        rest = text[e:]
        gap = len(rest) - len(rest.lstrip())
        eot = next((t for t in ends if rest[gap:].startswith(t)), None)
        if eot and not any(text[s:e].endswith(t) for t in ends):
            e += gap + len(eot)
        spans.append((s, e))
    return spans


def folded(messages):
    return [{**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}, *messages[2:]]


def check_rows(tok, entry, shape: str, rows: list[dict]) -> str | None:
    """ROWS: what the project made of SHAPE, each {"text", "trained_spans", "messages"?}. None when
    they are exact; else what is wrong."""
    messages, tools = SHAPES[shape]
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    system_ok = entry.get("system", True)
    for variant in ([messages] + ([folded(messages)] if messages[0]["role"] == "system" else [])):
        try:
            whole = _apply(tok, variant, tools)
        except Exception:  # noqa: BLE001 - transformers refuses this shape (e.g. a system turn)
            continue
        answers = [i for i, m in enumerate(variant) if m["role"] == "assistant"]
        if len(rows) == 1 and rows[0]["text"] == whole:
            want = [expected_spans(tok, variant, tools, answers, eots(entry), whole)]
            texts = [whole]
        elif len(rows) == len(answers):
            texts = [_apply(tok, variant[: i + 1], tools) for i in answers]
            want = [expected_spans(tok, variant[: i + 1], tools, [i], eots(entry), t) for i, t in zip(answers, texts)]
        else:
            continue
        if [r["text"] for r in rows] != texts:
            continue
        got = [merge([tuple(s) for s in r["trained_spans"]], t) for r, t in zip(rows, texts)]
        want = [merge(w, t) for w, t in zip(want, texts)]
        if got == want:
            if variant is not messages and system_ok and _keeps_system(tok, messages, tools):
                return "folded a system message the template renders"
            return None
        return f"trained spans {got} != expected {want}"
    return "text differs from apply_chat_template for every expected row split"


def _keeps_system(tok, messages, tools) -> bool:
    try:
        return messages[0]["content"] in _apply(tok, messages, tools)
    except Exception:  # noqa: BLE001
        return False


def merge(spans, text):
    """Sorted spans, those apart by whitespace only joined (a layout newline between an answer's
    end-of-turn and an EOS: trained or not, the model learns the same stop)."""
    out = []
    for s, e in sorted(spans):
        if out and (s <= out[-1][1] or not text[out[-1][1]:s].strip()):
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out
