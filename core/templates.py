"""Which chat template a run uses: a named one, the model's own ("auto": its marked TRL variant,
else the tokenizer's template labelled by prefix diff) or custom Jinja; and the checks that tell
people what a template will do to their data. Rendering lives in core.render, the one labelling
function (`encode_example`) in core.labels, the named sources in core.template_names."""

from __future__ import annotations

import re
from dataclasses import replace

import jinja2
from trl import chat_template_utils as trl_templates

from . import turns
from .labels import encode_example
from .render import ChatTemplate, TemplateError, compile_source, has_markers, render_source
from .template_names import ALIASES, NAMED

__all__ = ["ChatTemplate", "TemplateError", "NAMED", "resolve_template", "with_template", "missing_special_tokens", "template_warnings"]


def _probe_conversations() -> list[tuple[list[dict], bool]]:
    """(messages, add_generation_prompt) pairs: with/without system, single and multi-turn."""
    sys_ = {"role": "system", "content": "You are a terse probe."}
    u1 = {"role": "user", "content": "What is the capital of France?"}
    a1 = {"role": "assistant", "content": "Paris."}
    u2 = {"role": "user", "content": "And of Italy?"}
    a2 = {"role": "assistant", "content": "Rome."}
    return [
        ([u1, a1], False),
        ([sys_, u1, a1], False),
        ([u1, a1, u2, a2], False),
        ([sys_, u1, a1, u2, a2], False),
        ([u1], True),
        ([sys_, u1], True),
        ([u1, a1, u2], True),
    ]


def _copy(template: ChatTemplate, **changes) -> ChatTemplate:
    # Callers get their own lists, so nothing they do can change the NAMED registry.
    lists = {"special_tokens": list(template.special_tokens), "stop_strings": list(template.stop_strings), "probed": {}}
    return replace(template, **{**lists, **changes})


def _own_source(tokenizer) -> str | None:
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # a template shipped as named variants
        own = own.get("default")
    return own


_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def _twin_probes(kinds=("plain", "reasoning", "tools")) -> list[tuple[list[dict], bool, list | None]]:
    """The probes ("plain") plus the shapes a named twin must also render alike: reasoning in
    earlier answers (as <think> text and as reasoning_content), tools offered, a tool call and its
    result."""
    u1, u2 = {"role": "user", "content": "What is the capital of France?"}, {"role": "user", "content": "And of Italy?"}
    a1 = {"role": "assistant", "content": "Paris."}
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    extra = [
        ([u1, {**a1, "content": "<think>Easy.</think>Paris."}, u2, {"role": "assistant", "content": "Rome."}], False),
        ([u1, {**a1, "reasoning_content": "Easy."}, u2, {"role": "assistant", "content": "Rome."}], False),
    ]
    tools = [([u1, a1], False), ([u1], True), ([u1, call, {"role": "tool", "content": "21 C"}, a1], False)]
    return ([(m, g, None) for m, g in _probe_conversations() if "plain" in kinds]
            + [(m, g, None) for m, g in extra if "reasoning" in kinds]
            + [(m, g, [_TOOL]) for m, g in tools if "tools" in kinds])


def _renders_like(source_a: str, source_b: str, tokenizer, kinds=("plain", "reasoning", "tools")) -> bool:
    """Do two templates render every probe alike? A probe both refuse counts as alike."""
    for m, g, tools in _twin_probes(kinds):
        try:
            a = render_source(source_a, m, g, tokenizer, tools=tools)[0]
        except TemplateError:
            a = None
        try:
            b = render_source(source_b, m, g, tokenizer, tools=tools)[0]
        except TemplateError:
            b = None
        if a != b:
            return False
    return True


def _used_special_tokens(source: str, tokenizer) -> list[str]:
    # `<|...|>` literals plus any added token of this tokenizer that the source mentions.
    found = re.findall(r"<\|[^|\s'\"\\]+\|>", source)
    if tokenizer is not None:
        found += [t for t in tokenizer.added_tokens_encoder if t in source]
    return list(dict.fromkeys(found))


def _infer_eot(template: ChatTemplate, tokenizer) -> str | None:
    """The token that ends an answer (e.g. <|im_end|>), else None (= EOS): the special token the
    template writes right after the first answer of a two-turn conversation, else the one the first
    trained span ends with."""
    if tokenizer is None:
        return None
    specials = set(tokenizer.added_tokens_encoder) | ({tokenizer.eos_token} if tokenizer.eos_token else set())
    probe = _probe_conversations()[2][0]
    try:
        text = template.render(probe, tokenizer=tokenizer)
        after = text.find(probe[1]["content"], text.find(probe[0]["content"]) + 1)
        rest = text[after + len(probe[1]["content"]):].lstrip() if after >= 0 else ""
        found = [t for t in specials if rest.startswith(t)]
        if found:
            return max(found, key=len)
        text, spans = render_source(template.source, probe[:2], False, tokenizer, track=True) \
            if template.has_markers else turns.render_with_spans(template, probe[:2], tokenizer)
    except TemplateError:
        return None
    if not spans:
        return None
    answer = text[spans[0][0] : spans[0][1]].rstrip()
    candidates = [t for t in specials if answer.endswith(t)]
    return max(candidates, key=len) if candidates else None


def _auto(tokenizer) -> ChatTemplate:
    own = _own_source(tokenizer)
    if not own:
        raise TemplateError(
            "model has no chat template; pick a named template (e.g. chatml) or use pretraining text"
        )
    if has_markers(own):
        template = ChatTemplate("auto", own)
    else:
        try:  # TRL knows marked variants of several models' own templates (Qwen2.5, Phi-3, ...)
            trl_source = trl_templates.get_training_chat_template(tokenizer)
        except (ValueError, TypeError, jinja2.TemplateError):
            trl_source = None
        if trl_source and _renders_like(trl_source, own, tokenizer):  # some differ (GLM's adds a token)
            template = ChatTemplate("auto", trl_source)
        else:
            for named in NAMED.values():  # a named twin that renders identically
                if _renders_like(named.source, own, tokenizer):
                    return _copy(named, name="auto")
            template = ChatTemplate("auto", own)
            _check_prefix_diff(template, tokenizer)
    template.special_tokens = _used_special_tokens(template.source, tokenizer)
    template.eot_token = _infer_eot(template, tokenizer)
    return template


def _check_prefix_diff(template: ChatTemplate, tokenizer) -> None:
    """The simplest conversation must show an answer; other shapes (a system turn, tools...) are
    checked on the data's own rows, each refusal naming its reason."""
    try:
        found = turns.rows(template, {"messages": _probe_conversations()[0][0]}, tokenizer)
    except TemplateError as e:
        raise TemplateError(
            f"the model's own chat template can't be split into prompt and answer ({e}); "
            "pick a named template (e.g. chatml)"
        ) from e
    if not any(r.spans for r in found):
        raise TemplateError(
            "the model's own chat template shows no assistant answer to train on; "
            "pick a named template (e.g. chatml)"
        )


def resolve_template(tokenizer, template: str | None = "auto", custom_jinja: str | None = None,
                     **options) -> ChatTemplate:
    """Turn a user's choice ("auto", a family name or alias, or "custom") into a ChatTemplate;
    OPTIONS: train_on, reasoning, system (config.TemplateSection says what each does)."""
    chosen = _resolve(tokenizer, template, custom_jinja)
    for key, value in options.items():
        if key not in ("train_on", "reasoning", "system"):
            raise TypeError(f"unknown template option {key!r}")
        setattr(chosen, key, value)
    return chosen


def _resolve(tokenizer, template: str | None, custom_jinja: str | None) -> ChatTemplate:
    name = (template or "auto").strip().lower()
    if name == "auto":
        return _auto(tokenizer)
    if name == "custom":
        if not custom_jinja or not custom_jinja.strip():
            raise TemplateError("template 'custom' needs Jinja source (custom_jinja)")
        compile_source(custom_jinja)  # report syntax errors now, with their line number
        custom = ChatTemplate("custom", custom_jinja, _used_special_tokens(custom_jinja, tokenizer))
        custom.eot_token = _infer_eot(custom, tokenizer)
        return custom
    name = ALIASES.get(name, name)
    if name not in NAMED:
        raise TemplateError(
            f"unknown template {template!r}; choose auto, custom or one of: {', '.join(NAMED)}"
        )
    return _copy(NAMED[name])


def with_template(tokenizer, name: str | None = "auto", custom_jinja: str | None = None, copy: bool = False,
                  **options):
    """The one builder of tokenizer + template + added tokens, as training has them (the preview
    and the web app's token views use the same): the resolved template, and the template's special
    tokens the tokenizer lacks added to it (in place, or to a copy with COPY: a cached tokenizer
    serves other templates unchanged) -> (tokenizer, template, added tokens, their ids; their
    embedding rows get trained). OPTIONS: template.train_on / reasoning / system."""
    template = resolve_template(tokenizer, name or "auto", custom_jinja or None, **options)
    missing = missing_special_tokens(tokenizer, template)
    if not missing:
        return tokenizer, template, [], []
    if copy:
        import copy as copy_lib

        tokenizer = copy_lib.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return tokenizer, template, missing, tokenizer.convert_tokens_to_ids(missing)


def missing_special_tokens(tokenizer, template: ChatTemplate) -> list[str]:
    """Template tokens the tokenizer doesn't encode as one token (the trainer adds them)."""
    missing = []
    for token in template.special_tokens:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or tokenizer.convert_ids_to_tokens(ids[0]) != token:
            missing.append(token)
    return missing


# Bracketed so that no real default prompt shares its first or last character (see below).
_PROBE_SYSTEM = "\u27e6system probe\u27e7"


def _injected_default_system(template: ChatTemplate, tokenizer) -> str:
    """Text the template writes for a conversation without a system prompt that it replaces when
    one is given: the common prefix and suffix of the two renders are cut away."""
    convo = _probe_conversations()[0][0]
    bare = template.render(convo, tokenizer=tokenizer)
    with_system = template.render([{"role": "system", "content": _PROBE_SYSTEM}] + convo, tokenizer=tokenizer)
    head = 0
    while head < min(len(bare), len(with_system)) and bare[head] == with_system[head]:
        head += 1
    tail = 0
    while tail < len(bare) - head and tail < len(with_system) - head and bare[-1 - tail] == with_system[-1 - tail]:
        tail += 1
    return bare[head : len(bare) - tail].strip()


def template_warnings(tokenizer, template: ChatTemplate) -> list[str]:
    """Plain sentences for the UI/CLI about what this template will do to the training data."""
    warnings = []
    u = {"role": "user", "content": "What is the capital of France?"}
    a = {"role": "assistant", "content": "Paris."}
    try:
        if not turns.supports(template, tokenizer, "system"):
            what = ("rows with a system message are refused (template.system: refuse)" if template.system == "refuse"
                    else "system messages are folded into the first user turn (template.system: "
                         f"{template.system}; refuse skips such rows instead)")
            warnings.append(f"Template {template.name!r} has no system role in a conversation that ends with an "
                            f"answer (it raises, or drops the message as Mistral v0.3 does): {what}.")
        default = _injected_default_system(template, tokenizer)
        if default:
            warnings.append(
                f"Template {template.name!r} injects a default system prompt when a conversation "
                f"has none: \"{default[:60]}{'…' if len(default) > 60 else ''}\"."
            )
        enc = encode_example(tokenizer, template, {"messages": [u, a]})
        eot = template.eot(tokenizer)
        trained = tokenizer.decode([i for i, m in zip(enc.input_ids, enc.mask) if m])
        if eot is None:
            warnings.append(
                f"Template {template.name!r} has no end-of-turn token and the tokenizer no EOS: "
                "the model will not learn to stop."
            )
        elif eot not in trained:
            warnings.append(
                f"The end-of-turn token {eot!r} is not trained: the model may not learn to stop."
            )
    except TemplateError as e:
        warnings.append(f"Template {template.name!r} fails on a simple conversation: {e}")
    own = _own_source(tokenizer)
    if template.name != "auto" and own and not _renders_like(template.source, own, tokenizer, ("plain",)):
        warnings.append(
            f"Template {template.name!r} formats conversations differently from the model's own "
            "chat template; the model will have to learn the new format (use 'auto' to keep its own)."
        )
    elif template.name != "auto" and own and not _renders_like(template.source, own, tokenizer, ("reasoning", "tools")):
        warnings.append(
            f"Template {template.name!r} renders reasoning or tool calls differently from the model's own chat "
            "template: for data with <think> blocks, tools or tool calls use 'auto'."
        )
    missing = missing_special_tokens(tokenizer, template)
    if missing:
        warnings.append(
            f"The tokenizer lacks the template's special tokens {', '.join(missing)}: they will be "
            "added, the embeddings resized and the new rows trained."
        )
    return warnings
