"""Which chat template a run uses: a named one, the model's own ("auto": its marked TRL variant,
else the tokenizer's template labelled by prefix diff) or custom Jinja; and the checks that tell
people what a template will do to their data. Rendering lives in core.render, the one labelling
function (`encode_example`) in core.labels, the named sources in core.template_names."""

from __future__ import annotations

import re
from dataclasses import replace

import jinja2
from trl import chat_template_utils as trl_templates

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
    lists = {"special_tokens": list(template.special_tokens), "stop_strings": list(template.stop_strings)}
    return replace(template, **{**lists, **changes})


def _own_source(tokenizer) -> str | None:
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # a template shipped as named variants
        own = own.get("default")
    return own


def _renders_like(source_a: str, source_b: str, tokenizer) -> bool:
    try:
        return all(
            render_source(source_a, m, g, tokenizer)[0] == render_source(source_b, m, g, tokenizer)[0]
            for m, g in _probe_conversations()
        )
    except TemplateError:
        return False


def _used_special_tokens(source: str, tokenizer) -> list[str]:
    # `<|...|>` literals plus any added token of this tokenizer that the source mentions.
    found = re.findall(r"<\|[^|\s'\"\\]+\|>", source)
    if tokenizer is not None:
        found += [t for t in tokenizer.added_tokens_encoder if t in source]
    return list(dict.fromkeys(found))


def _infer_eot(template: ChatTemplate, tokenizer) -> str | None:
    """The added token the first trained span ends with (e.g. <|im_end|>), else None (= EOS)."""
    if tokenizer is None:
        return None
    try:
        text, spans = template.render_with_spans(_probe_conversations()[0][0], tokenizer)
    except TemplateError:
        return None
    if not spans:
        return None
    answer = text[spans[0][0] : spans[0][1]]
    candidates = [t for t in tokenizer.added_tokens_encoder if answer.endswith(t)]
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
        if trl_source:
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
    for messages, generation_prompt in _probe_conversations():
        if generation_prompt:
            continue
        try:
            _, spans = template.render_with_spans(messages, tokenizer)
        except TemplateError as e:
            raise TemplateError(
                f"the model's own chat template can't be split into prompt and answer ({e}); "
                "pick a named template (e.g. chatml)"
            ) from e
        if not spans:
            raise TemplateError(
                "the model's own chat template shows no assistant answer to train on; "
                "pick a named template (e.g. chatml)"
            )


def resolve_template(tokenizer, template: str | None = "auto", custom_jinja: str | None = None) -> ChatTemplate:
    """Turn a user's choice ("auto", a family name or alias, or "custom") into a ChatTemplate."""
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


def with_template(tokenizer, name: str | None = "auto", custom_jinja: str | None = None, copy: bool = False):
    """The one builder of tokenizer + template + added tokens, as training has them (the preview
    and the web app's token views use the same): the resolved template, and the template's special
    tokens the tokenizer lacks added to it (in place, or to a copy with COPY: a cached tokenizer
    serves other templates unchanged) -> (tokenizer, template, added tokens, their ids; their
    embedding rows get trained)."""
    template = resolve_template(tokenizer, name or "auto", custom_jinja or None)
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
        text = template.render([{"role": "system", "content": _PROBE_SYSTEM}, u, a], tokenizer=tokenizer)
        if _PROBE_SYSTEM not in text:
            warnings.append(
                f"Template {template.name!r} drops the system prompt from conversations that end "
                "with an assistant answer (Mistral v0.3 does this): system messages in your data "
                "will not be seen in training."
            )
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
    if template.name != "auto" and own and not _renders_like(template.source, own, tokenizer):
        warnings.append(
            f"Template {template.name!r} formats conversations differently from the model's own "
            "chat template; the model will have to learn the new format (use 'auto' to keep its own)."
        )
    missing = missing_special_tokens(tokenizer, template)
    if missing:
        warnings.append(
            f"The tokenizer lacks the template's special tokens {', '.join(missing)}: they will be "
            "added, the embeddings resized and the new rows trained."
        )
    return warnings
