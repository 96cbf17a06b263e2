"""From one conversation to the rows training sees: which text is rendered and which character
spans of it are trained (every assistant answer with its end-of-turn, or the last only).

The template's options decide what happens first (template.system, template.reasoning), then the
answers are located:

* a template with `{% generation %}` markers: the marked spans of one render;
* any other template: prefix diff on the conversation itself. The answer to assistant turn i is
  render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True). When every turn's
  render is a prefix of the whole, the conversation is one row with every answer trained;
* a template that renders earlier turns differently as the conversation grows (it strips reasoning
  from earlier answers, moves the system prompt to the last user turn, stamps the last turn...):
  one row per answer, each the conversation up to that answer rendered as the template renders it
  then, training that answer only: what the model sees when it writes that answer at inference.

A span is extended over the end-of-turn token the template writes right after it (templates that
close a turn only when another follows, like Qwen1.5's, still teach the model to stop)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .render import TemplateError, render_source, trim_spans

SPLIT_NOTE = "one row per answer (the template renders earlier turns differently as the conversation grows)"
FOLD_NOTE = "system message folded into the first user turn (the template has no system role)"
INLINE_NOTE = "reasoning written into the answer as <think>...</think> (the template has no reasoning field)"
STRIP_NOTE = "reasoning removed from the answers (template.reasoning: strip)"
_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)
_PROBE = "\u27e6probe\u27e7"


@dataclass
class Row:
    messages: list[dict]  # what was rendered (after the system/reasoning options)
    text: str
    spans: list[tuple[int, int]]  # trained character spans of text
    notes: list[str] = field(default_factory=list)


def _render(template, messages, tokenizer, tools, generation_prompt=False, track=False):
    return render_source(template.source, messages, generation_prompt, tokenizer, track, tools)


def supports(template, tokenizer, what: str) -> bool:
    """Does the template render a system message / an answer's reasoning_content? (Cached per
    template object: probed once with a conversation of the data's simplest shape.)"""
    key = (what, id(tokenizer))
    cache = template.probed
    if key not in cache:
        u, a = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}
        convo = [{"role": "system", "content": _PROBE}, u, a] if what == "system" else \
            [u, {**a, "reasoning_content": _PROBE}]
        try:
            cache[key] = _PROBE in _render(template, convo, tokenizer, None)[0]
        except TemplateError:
            cache[key] = False
    return cache[key]


def _fold_system(messages: list[dict]) -> list[dict]:
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    rest[0]["content"] = system + "\n\n" + rest[0]["content"]  # as Gemma 3's own template folds it
    return rest


def _without_reasoning(m: dict) -> dict:
    m = {k: v for k, v in m.items() if k not in ("reasoning_content", "reasoning", "thinking")}
    m["content"] = _THINK.sub("", m.get("content") or "", count=1)
    return m


def _inline_reasoning(m: dict) -> dict:
    r = m.get("reasoning_content")
    m = {k: v for k, v in m.items() if k != "reasoning_content"}
    m["content"] = f"<think>\n{r.strip()}\n</think>\n\n{m.get('content') or ''}"
    return m


def prepare(template, messages: list[dict], tokenizer, inline: bool = False) -> tuple[list[dict], list[str]]:
    """Apply template.system and template.reasoning -> (messages to render, notes). INLINE: write
    reasoning into the answers even where the template has a field for it."""
    notes = []
    if messages and messages[0]["role"] == "system":
        supported = supports(template, tokenizer, "system")
        if template.system == "fold" or (template.system == "auto" and not supported):
            messages = _fold_system(messages)
            notes.append(FOLD_NOTE)
        elif not supported:  # refuse
            raise TemplateError(f"template {template.name!r} has no system role, so this row's system message "
                                "would be lost (template.system: fold writes it into the first user turn)")
    thinking = [m.get("reasoning_content") or _THINK.match(m.get("content") or "") for m in messages
                if m["role"] == "assistant"]
    if any(thinking):
        if template.reasoning == "strip":
            messages = [_without_reasoning(m) if m["role"] == "assistant" else m for m in messages]
            notes.append(STRIP_NOTE)
        elif any(m.get("reasoning_content") for m in messages) and (
                inline or not supports(template, tokenizer, "reasoning")):
            messages = [_inline_reasoning(m) if m.get("reasoning_content") else m for m in messages]
            notes.append(INLINE_NOTE)
    return messages, notes


def _eot_after(text: str, end: int, eot: str | None) -> int:
    """END moved past the end-of-turn token that follows it (after whitespace), if one does."""
    if not eot:
        return end
    rest = text[end:]
    gap = len(rest) - len(rest.lstrip())
    if rest[gap:].startswith(eot):
        return end + gap + len(eot)
    return end


def _finish_spans(text, spans, eot):
    out = []
    for s, e in trim_spans(text, spans):
        if eot and not text[s:e].endswith(eot):
            e = _eot_after(text, e, eot)
        out.append((s, e))
    return out


def _common_prefix(a: str, b: str) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _clip_to_answers(template, messages, tokenizer, tools, text, spans, answers, wanted):
    """Marked spans, less what a generation prompt already writes (an empty <think></think> that
    the prompt opens with is not the model's to learn), and only those of the WANTED answers."""
    starts = []  # where each answer's generation prompt stops agreeing with TEXT
    for i in answers:
        prompt = _render(template, messages[:i], tokenizer, tools, generation_prompt=True)[0]
        starts.append(len(prompt) if text.startswith(prompt) else _common_prefix(prompt, text))
    out = []
    for s, e in trim_spans(text, spans):
        owner = max((k for k, p in enumerate(starts) if p is not None and p < e), default=None)
        if owner is not None:
            s = max(s, starts[owner])
            if answers[owner] not in wanted:
                continue
        elif len(wanted) < len(answers):
            continue
        out += trim_spans(text, [(s, e)])
    return out


class _Unstable(Exception):
    pass


def _answer(template, messages, i, tokenizer, tools, full: str | None) -> tuple[int, int]:
    """Span of the answer to assistant turn i in render(messages[:i+1]) (and in FULL, which must
    then start with that render)."""
    prompt = _render(template, messages[:i], tokenizer, tools, generation_prompt=True)[0]
    upto = _render(template, messages[: i + 1], tokenizer, tools)[0]
    if full is not None:
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise _Unstable
        return len(prompt), len(upto)
    start = len(prompt)
    if not upto.startswith(prompt):
        # The generation prompt and the rendered answer part ways inside the turn's header (e.g. a
        # prompt that opens a <think> block): train from where they part, if the answer is after it.
        start = _common_prefix(prompt, upto)
        content = (messages[i].get("content") or "").strip()
        if content and content not in upto[start:]:
            raise TemplateError(f"template {template.name!r} renders the conversation before an answer differently "
                                "from its generation prompt, so the answer can't be located")
    return start, len(upto)


def _reasoning_of(m: dict) -> str:
    found = _THINK.match(m.get("content") or "")
    return (m.get("reasoning_content") or (found.group(1) if found else "")).strip()


def _lost_reasoning(row_list: list[Row]) -> bool:
    return any(_reasoning_of(m) not in row.text for row in row_list for m in row.messages if m["role"] == "assistant")


def rows(template, example: dict, tokenizer) -> list[Row]:
    """THE split of a conversation into trained rows (labels.encode_rows tokenises them).
    template.reasoning "keep": every answer's reasoning stays in the text, in one row when the
    template allows it; a template that removes it from earlier turns even when it is written
    into them is refused for that row."""
    out = _rows(template, example, tokenizer, inline=False)
    if template.reasoning != "keep" or not _lost_reasoning(out):
        return out
    out = _rows(template, example, tokenizer, inline=True)
    if len(out) > 1 or _lost_reasoning(out):
        raise TemplateError(f"template {template.name!r} removes the reasoning of earlier answers even when it is "
                            "written into them, so template.reasoning: keep can't be met; use auto (each answer "
                            "trained in its own row, with its reasoning) or strip")
    return out


def _rows(template, example: dict, tokenizer, inline: bool) -> list[Row]:
    messages, notes = prepare(template, example["messages"], tokenizer, inline)
    tools = example.get("tools")
    eot = template.eot(tokenizer)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
    wanted = answers if template.train_on == "all" else answers[-1:]
    if template.has_markers:  # the markers say what is trained: no end-of-turn search
        text, spans = _render(template, messages, tokenizer, tools, track=True)
        return [Row(messages, text, _clip_to_answers(template, messages, tokenizer, tools, text, spans, answers,
                                                      wanted), notes)]
    full = _render(template, messages, tokenizer, tools)[0]
    try:
        spans = [_answer(template, messages, i, tokenizer, tools, full) for i in wanted]
        return [Row(messages, full, _finish_spans(full, spans, eot), notes)]
    except _Unstable:
        pass
    out = []
    for i in wanted:
        part = messages[: i + 1]
        text = _render(template, part, tokenizer, tools)[0]
        span = _answer(template, part, i, tokenizer, tools, None)
        out.append(Row(part, text, _finish_spans(text, [span], eot), notes + [SPLIT_NOTE]))
    return out


def render_with_spans(template, messages, tokenizer=None, tools=None) -> tuple[str, list[tuple[int, int]]]:
    """(text, trained spans) of a conversation that trains as one row."""
    found = rows(template, {"messages": messages, **({"tools": tools} if tools else {})}, tokenizer)
    if len(found) != 1:
        raise TemplateError(f"template {template.name!r} trains this conversation as {len(found)} rows, one per answer")
    return found[0].text, found[0].spans
