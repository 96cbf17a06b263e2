"""Rendering a chat template, and the character spans of what it trains.

A `ChatTemplate` is Jinja source rendered in transformers' sandbox settings (the
ImmutableSandboxedEnvironment `apply_chat_template` uses, core.sandbox adds bounds on work and
size), so a rendered text is byte-identical to what the tokenizer's own `apply_chat_template`
would give for the same source. Trained text is
found in one of two ways:

* `{% generation %}...{% endgeneration %}` markers (transformers' AssistantTracker reports their
  character spans). Every NAMED template is marked; TRL ships marked variants of several models'
  own templates, which "auto" reuses.
* Prefix diff, for unmarked templates: the answer to assistant turn i is
  render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True) (core.turns, which
  also splits a conversation into one row per answer where a template needs that).

Spans are trimmed of whitespace at both ends: whitespace around a turn is template layout (the
"\\n" after "assistant" or after "<|im_end|>" in ChatML), not something the model should learn to
emit. A token is trained iff its character range overlaps a trained span.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jinja2
from transformers.utils.chat_template_utils import _alias_reasoning_fields, _plain_template_data
from trl import chat_template_utils as trl_templates

from . import sandbox


class TemplateError(ValueError):
    """A chat template that can't be used: bad Jinja, refused by the sandbox, raises, marks nothing..."""


def has_markers(source: str) -> bool:
    return trl_templates.has_generation_markers(source)


def _template_kwargs(tokenizer) -> dict:
    # Exactly what apply_chat_template passes (bos_token, eos_token, ...), so renders match it.
    return dict(tokenizer.special_tokens_map) if tokenizer is not None else {}


def compile_source(source: str):
    try:
        return sandbox.compile_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from e
    except sandbox.TemplateLimit as e:
        raise TemplateError(f"chat template refused: {e}") from e


def _plain(conversation):
    """What apply_chat_template hands a template: plain JSON-like copies (reasoning aliased)."""
    return _alias_reasoning_fields(_plain_template_data(conversation))


def render_batch(source, conversations, add_generation_prompt=False, tokenizer=None, track=False, tools_per_row=None):
    """Render conversations in the bounded sandbox (core.sandbox: transformers' environment, with
    bounds on work and size); returns (texts, generation spans per text). TOOLS_PER_ROW: each
    conversation's tool schemas (None where it has none), as apply_chat_template(tools=...)."""
    compile_source(source)  # syntax errors get a line number before anything else
    kwargs = _plain_template_data(_template_kwargs(tokenizer))
    texts, indices = [], []
    for k, conversation in enumerate(conversations):
        row_tools = tools_per_row[k] if tools_per_row else None
        try:
            text, spans = sandbox.render(source, _plain(conversation), track=track,
                                         tools=_plain_template_data(row_tools) if row_tools else None,
                                         add_generation_prompt=add_generation_prompt, **kwargs)
        except sandbox.TemplateLimit as e:
            raise TemplateError(f"chat template stopped: {e}") from e
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"chat template refused by the sandbox (unsafe access): {e}") from e
        except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as e:
            raise TemplateError(f"chat template failed: {e}") from e
        texts.append(text)
        indices.append(spans)
    return texts, indices


def render_source(source, messages, add_generation_prompt=False, tokenizer=None, track=False, tools=None):
    """Render one conversation; returns (text, generation spans)."""
    texts, indices = render_batch(source, [messages], add_generation_prompt, tokenizer, track, [tools])
    return texts[0], indices[0]


def trim_spans(text: str, spans) -> list[tuple[int, int]]:
    out = []
    for start, end in spans:
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if end > start:
            out.append((start, end))
    return out


@dataclass
class ChatTemplate:
    name: str  # "auto" (the tokenizer's own), a NAMED family, or "custom"
    source: str  # Jinja; marked with {% generation %} where we have a marked variant
    special_tokens: list[str] = field(default_factory=list)  # must be single tokens in the vocab
    eot_token: str | None = None  # None: the tokenizer's eos_token ends a turn
    stop_strings: list[str] = field(default_factory=list)  # extra stops for generate(stop_strings=...)
    train_on: str = "all"  # template.train_on: every assistant answer, or the "last" only
    reasoning: str = "auto"  # template.reasoning: auto (as the template does), keep, strip
    system: str = "auto"  # template.system: auto (fold where it has no system role), fold, refuse
    probed: dict = field(default_factory=dict, repr=False, compare=False)  # core.turns' per-template probes

    @property
    def has_markers(self) -> bool:
        return has_markers(self.source)

    def eot(self, tokenizer=None) -> str | None:
        """The token generation must stop at: our own, else the tokenizer's EOS."""
        return self.eot_token or (tokenizer.eos_token if tokenizer is not None else None)

    def render(self, messages, add_generation_prompt=False, tokenizer=None, tools=None) -> str:
        return render_source(self.source, messages, add_generation_prompt, tokenizer, tools=tools)[0]
