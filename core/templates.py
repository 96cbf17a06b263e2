"""Chat templates and the one labelling function (`encode_example`).

A `ChatTemplate` is Jinja source rendered in transformers' sandbox settings (the
ImmutableSandboxedEnvironment `apply_chat_template` uses, core.sandbox adds bounds on work and
size), so a rendered text is byte-identical to what the tokenizer's own `apply_chat_template`
would give for the same source. Trained text is
found in one of two ways:

* `{% generation %}...{% endgeneration %}` markers (transformers' AssistantTracker reports their
  character spans). Every NAMED template is marked; TRL ships marked variants of several models'
  own templates, which "auto" reuses.
* Prefix diff, for unmarked templates: the answer to assistant turn i is
  render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True).

Spans are trimmed of whitespace at both ends: whitespace around a turn is template layout (the
"\\n" after "assistant" or after "<|im_end|>" in ChatML), not something the model should learn to
emit. A token is trained iff its character range overlaps a trained span.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import re
import threading
from dataclasses import dataclass, field, replace

import jinja2
import numpy as np
from transformers.utils.chat_template_utils import _alias_reasoning_fields, _plain_template_data
from trl import chat_template_utils as trl_templates

from . import sandbox


class TemplateError(ValueError):
    """A chat template that can't be used: bad Jinja, refused by the sandbox, raises, marks nothing..."""


def _has_markers(source: str) -> bool:
    return trl_templates.has_generation_markers(source)


def _template_kwargs(tokenizer) -> dict:
    # Exactly what apply_chat_template passes (bos_token, eos_token, ...), so renders match it.
    return dict(tokenizer.special_tokens_map) if tokenizer is not None else {}


def _compile(source: str):
    try:
        return sandbox.compile_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from e
    except sandbox.TemplateLimit as e:
        raise TemplateError(f"chat template refused: {e}") from e


def _plain(conversation):
    """What apply_chat_template hands a template: plain JSON-like copies (reasoning aliased)."""
    return _alias_reasoning_fields(_plain_template_data(conversation))


def _render_batch(source, conversations, add_generation_prompt=False, tokenizer=None, track=False):
    """Render conversations in the bounded sandbox (core.sandbox: transformers' environment, with
    bounds on work and size); returns (texts, generation spans per text)."""
    _compile(source)  # syntax errors get a line number before anything else
    kwargs = _plain_template_data(_template_kwargs(tokenizer))
    texts, indices = [], []
    for conversation in conversations:
        try:
            text, spans = sandbox.render(source, _plain(conversation), track=track,
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


def _render_source(source, messages, add_generation_prompt=False, tokenizer=None, track=False):
    """Render one conversation; returns (text, generation spans)."""
    texts, indices = _render_batch(source, [messages], add_generation_prompt, tokenizer, track)
    return texts[0], indices[0]


def _trim(text: str, spans) -> list[tuple[int, int]]:
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

    @property
    def has_markers(self) -> bool:
        return _has_markers(self.source)

    def eot(self, tokenizer=None) -> str | None:
        """The token generation must stop at: our own, else the tokenizer's EOS."""
        return self.eot_token or (tokenizer.eos_token if tokenizer is not None else None)

    def render(self, messages, add_generation_prompt=False, tokenizer=None) -> str:
        return _render_source(self.source, messages, add_generation_prompt, tokenizer)[0]

    def render_with_spans(self, messages, tokenizer=None) -> tuple[str, list[tuple[int, int]]]:
        if self.has_markers:
            text, spans = _render_source(self.source, messages, False, tokenizer, track=True)
        else:
            text, spans = self._prefix_diff(messages, tokenizer)
        return text, _trim(text, spans)

    def _prefix_diff(self, messages, tokenizer):
        full = self.render(messages, tokenizer=tokenizer)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i == 0:
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True, tokenizer=tokenizer)
            upto = self.render(messages[: i + 1], tokenizer=tokenizer)
            # Both must be prefixes of the full render, otherwise the template rewrites earlier
            # turns as the conversation grows and the difference is not "the answer".
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise TemplateError(
                    f"template {self.name!r} renders earlier turns differently as the conversation "
                    "grows, so the assistant answers can't be located; pick a named template "
                    "(e.g. chatml) instead"
                )
            spans.append((len(prompt), len(upto)))
        return full, spans


# --- named templates -----------------------------------------------------------------------------
# Each marks exactly an assistant turn's content and its end-of-turn token, never the header
# before it or the layout newline after it. Templates that use the model's own EOS write
# `{{- eos_token }}` on its own so a tokenizer without one renders "" instead of failing.

_CHATML_LOOP = r"""
{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def _chatml(default_system: str | None = None, bos: bool = False) -> str:
    head = "{{- bos_token }}\n" if bos else ""
    if default_system:
        head += (
            "{%- if messages[0].role != 'system' %}\n"
            "    {{- '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}\n"
            "{%- endif %}\n"
        )
    return head + _CHATML_LOOP


QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SMOLLM_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

_LLAMA2 = r"""
{%- if messages[0].role == 'system' %}
    {%- set system_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = false %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if loop.index0 == 0 and system_message != false %}
        {%- set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message.content %}
    {%- else %}
        {%- set content = message.content %}
    {%- endif %}
    {%- if message.role == 'user' %}
        {{- bos_token }}{{- '[INST] ' + content.strip() + ' [/INST]' }}
    {%- else %}
        {{- ' ' }}
        {%- generation %}{{- content.strip() + ' ' }}{{- eos_token }}{%- endgeneration %}
    {%- endif %}
{%- endfor %}
"""

# Mistral v0.3 as shipped (tools left out): the system prompt goes before the user turn only when
# that turn is the LAST message, so a training conversation (ending with the assistant) loses it.
_MISTRAL = r"""
{%- if messages[0].role == 'system' %}
    {%- set system_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message.role == 'user' %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\n\n' + message.content + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message.content + '[/INST]' }}
        {%- endif %}
    {%- else %}
        {{- ' ' }}
        {%- generation %}{{- message.content | trim }}{{- eos_token }}{%- endgeneration %}
    {%- endif %}
{%- endfor %}
"""

# Gemma has no system role: like Gemma 3, the system prompt is folded into the first user turn.
_GEMMA = r"""
{{- bos_token }}
{%- if messages[0].role == 'system' %}
    {%- set first_user_prefix = messages[0].content + '\n\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message.role == 'assistant' %}
        {{- '<start_of_turn>model\n' }}
        {%- generation %}{{- message.content | trim + '<end_of_turn>' }}{%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<start_of_turn>user\n' + (first_user_prefix if loop.first else '') + message.content | trim + '<end_of_turn>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\n' }}
{%- endif %}
"""

# Zephyr (also TinyLlama-chat): role tags are plain text, turns end with the model's EOS.
_ZEPHYR = r"""
{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {{- '<|assistant|>\n' }}
        {%- generation %}{{- message.content }}{{- eos_token }}{%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<|' + message.role + '|>\n' + message.content }}{{- eos_token }}{{- '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\n' }}
{%- endif %}
"""

# Vicuna v1.1 (FastChat): "SYSTEM USER: q ASSISTANT: a</s>USER: ..."
_VICUNA = r"""
{%- if messages[0].role == 'system' %}
    {%- set system_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions." %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- system_message + ' ' }}
{%- for message in loop_messages %}
    {%- if message.role == 'user' %}
        {{- 'USER: ' + message.content + ' ' }}
    {%- else %}
        {{- 'ASSISTANT: ' }}
        {%- generation %}{{- message.content }}{{- eos_token }}{%- endgeneration %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'ASSISTANT:' }}
{%- endif %}
"""

# Alpaca: the user turn already ends with the "### Response:" header, so no generation prompt.
_ALPACA = r"""
{%- if messages[0].role == 'system' %}
    {%- set system_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = 'Below is an instruction that describes a task. Write a response that appropriately completes the request.' %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- system_message + '\n\n' }}
{%- for message in loop_messages %}
    {%- if message.role == 'user' %}
        {{- '### Instruction:\n' + message.content + '\n\n### Response:\n' }}
    {%- else %}
        {%- generation %}{{- message.content }}{{- eos_token }}{%- endgeneration %}
        {{- '\n\n' }}
    {%- endif %}
{%- endfor %}
"""

# DeepSeek LLM chat (v1/v2), as shipped by deepseek-llm-7b-chat.
_DEEPSEEK = r"""
{{- bos_token }}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {{- message.content + '\n\n' }}
    {%- elif message.role == 'user' %}
        {{- 'User: ' + message.content + '\n\n' }}
    {%- else %}
        {{- 'Assistant: ' }}
        {%- generation %}{{- message.content }}{{- eos_token }}{%- endgeneration %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'Assistant:' }}
{%- endif %}
"""

# Plain: no special tokens at all, for base models with no chat format. The system prompt is a
# leading paragraph, then "User: ...\nAssistant: ...<eos>\n" per exchange. The generation prompt
# is "Assistant:" without the space, because BPE tokenizers put that space in the answer's first
# token, which is how the answer was tokenized in training.
_PLAIN = r"""
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {{- message.content + '\n\n' }}
    {%- elif message.role == 'user' %}
        {{- 'User: ' + message.content + '\n' }}
    {%- else %}
        {{- 'Assistant: ' }}
        {%- generation %}{{- message.content }}{{- eos_token }}{%- endgeneration %}
        {{- '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'Assistant:' }}
{%- endif %}
"""

_IM = ["<|im_start|>", "<|im_end|>"]

NAMED: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate("chatml", _chatml(), _IM, "<|im_end|>"),
    "qwen": ChatTemplate("qwen", _chatml(QWEN_DEFAULT_SYSTEM), _IM, "<|im_end|>"),
    "smollm": ChatTemplate("smollm", _chatml(SMOLLM_DEFAULT_SYSTEM), _IM, "<|im_end|>"),
    "internlm2": ChatTemplate("internlm2", _chatml(bos=True), _IM, "<|im_end|>"),
    "llama2": ChatTemplate("llama2", _LLAMA2, [], None, ["[INST]"]),
    # TRL's marked Llama 3 and Phi-3 templates render exactly like the models' own.
    "llama3": ChatTemplate(
        "llama3",
        trl_templates.llama3_training_chat_template,
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
    ),
    "mistral": ChatTemplate("mistral", _MISTRAL, ["[INST]", "[/INST]"], None, ["[INST]"]),
    "gemma": ChatTemplate("gemma", _GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    "phi3": ChatTemplate(
        "phi3",
        trl_templates.phi3_training_chat_template,
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "<|end|>",
    ),
    "zephyr": ChatTemplate("zephyr", _ZEPHYR, [], None, ["<|user|>"]),
    "vicuna": ChatTemplate("vicuna", _VICUNA, [], None, ["USER:"]),
    "alpaca": ChatTemplate("alpaca", _ALPACA, [], None, ["### Instruction:"]),
    "deepseek": ChatTemplate("deepseek", _DEEPSEEK, [], None, ["User:"]),
    "plain": ChatTemplate("plain", _PLAIN, [], None, ["\nUser:"]),
}

ALIASES = {
    "qwen2": "qwen", "qwen2.5": "qwen", "qwen2_5": "qwen", "im_start": "chatml",
    "smollm2": "smollm", "internlm": "internlm2",
    "llama-2": "llama2", "llama2-chat": "llama2",
    "llama-3": "llama3", "llama3.1": "llama3", "llama3.2": "llama3",
    "mistral-v0.3": "mistral", "mistral-instruct": "mistral",
    "gemma2": "gemma", "gemma3": "gemma", "phi-3": "phi3", "phi3-mini": "phi3",
    "tinyllama": "zephyr", "tinyllama-chat": "zephyr", "vicuna_v1.1": "vicuna",
    "deepseek-llm": "deepseek", "raw": "plain", "none": "plain",
}  # fmt: skip


# --- resolving ----------------------------------------------------------------------------------

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
            _render_source(source_a, m, g, tokenizer)[0] == _render_source(source_b, m, g, tokenizer)[0]
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
    if _has_markers(own):
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
        _compile(custom_jinja)  # report syntax errors now, with their line number
        custom = ChatTemplate("custom", custom_jinja, _used_special_tokens(custom_jinja, tokenizer))
        custom.eot_token = _infer_eot(custom, tokenizer)
        return custom
    name = ALIASES.get(name, name)
    if name not in NAMED:
        raise TemplateError(
            f"unknown template {template!r}; choose auto, custom or one of: {', '.join(NAMED)}"
        )
    return _copy(NAMED[name])


# --- encoding -----------------------------------------------------------------------------------

@dataclass
class Encoded:
    input_ids: list[int]
    mask: list[int]  # 1 = trained (label = id), 0 = masked (label = -100)
    text: str  # rendered text (before truncation)
    spans: list[tuple[int, int]]  # trained character spans in text (clipped at truncation)
    truncated: bool
    n_trained: int


def _no_trained_tokens(template: ChatTemplate) -> TemplateError:
    return TemplateError(
        f"template {template.name!r} marks no assistant tokens for training "
        "(it drops or never renders the assistant answers)"
    )


def _finish(ids, mask, text, spans, max_length, kept_end) -> Encoded:
    """Truncation (keep the head: the prompt and the start of the answer) and the Encoded.
    kept_end(n): end character of the first n tokens, or None for text rows (spans kept)."""
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
        if kept_end is not None:
            end = kept_end(max_length)
            spans = [(s, min(e, end)) for s, e in spans if s < end]
    return Encoded(ids, mask, text, spans, truncated, sum(mask))


def _eos_appended(tokenizer, ids) -> list[int]:
    ids = list(ids)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)  # teach the model to end a document
    return ids


def encode_example(tokenizer, template: ChatTemplate | None, example: dict, max_length: int | None = None) -> Encoded:
    """THE labelling function: a normalised example -> input_ids + trained-token mask.
    (`encode_examples` is the batched twin: same results, one tokenizer call for many rows.)"""
    if "messages" in example:
        if template is None:
            raise TemplateError("a chat example needs a chat template")
        text, spans = template.render_with_spans(example["messages"], tokenizer)
        # The template already wrote BOS where it wants one, as apply_chat_template(tokenize=True).
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError as e:  # slow (pure Python) tokenizers have no offsets
            raise TemplateError(f"tokenizer {type(tokenizer).__name__} can't map tokens to characters: {e}") from e
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        mask = [int(any(s < se and e > ss for ss, se in spans)) for s, e in offsets]
        if not any(mask):
            raise _no_trained_tokens(template)
        return _finish(ids, mask, text, spans, max_length,
                       lambda n: max((e for _, e in offsets[:n]), default=0))
    elif "text" in example:
        text = example["text"]
        ids = _eos_appended(tokenizer, tokenizer(text, add_special_tokens=True)["input_ids"])
        return _finish(ids, [1] * len(ids), text, [(0, len(text))] if text else [], max_length, None)
    else:
        raise TemplateError("example has neither 'messages' nor 'text'")


def _render_many(template: ChatTemplate, conversations: list, tokenizer) -> list[tuple[str, list[tuple[int, int]]]]:
    """template.render_with_spans for many conversations: a marked template renders them all in one
    render_jinja_template call (compiled once, the same sandbox and kwargs, so the same texts and
    generation spans); an unmarked one needs its per-conversation prefix diff."""
    if not template.has_markers:
        return [template.render_with_spans(m, tokenizer) for m in conversations]
    texts, indices = _render_batch(template.source, conversations, False, tokenizer, track=True)
    return [(text, _trim(text, spans)) for text, spans in zip(texts, indices)]


def _masks_from_offsets(offsets: list, spans: list) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised `int(any(s < se and e > ss for ss, se in row_spans))` for every token of every row.
    -> (flat 0/1 mask over all tokens, row start indices into it, with the total appended).

    Where a row's token starts and ends are non-decreasing (what fast tokenizers give), the tokens
    a span (ss, se) trains are exactly the run [first with end > ss, first with start >= se): found by
    one searchsorted over keys row * BIG + offset (sorted across rows) and marked with a difference
    array. Other rows are computed by the plain formula."""
    lengths = np.fromiter((len(o) for o in offsets), dtype=np.int64, count=len(offsets))
    bounds = np.zeros(len(offsets) + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    total = int(bounds[-1])
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(offsets)), dtype=np.int64,
                       count=2 * total).reshape(total, 2)
    starts, ends = flat[:, 0].copy(), flat[:, 1].copy()
    row_of = np.repeat(np.arange(len(offsets), dtype=np.int64), lengths)
    # a row is "monotonic" when no token starts or ends before the previous one of the same row
    first = np.zeros(total, dtype=bool)
    first[bounds[:-1][lengths > 0]] = True
    bad_tok = ~first[1:] & ((np.diff(starts) < 0) | (np.diff(ends) < 0))
    bad_rows = np.unique(row_of[1:][bad_tok])
    if bad_rows.size:  # neutralise them, so the keys stay sorted; their masks are done below
        bad = np.isin(row_of, bad_rows)
        starts[bad] = 0
        ends[bad] = 0
    big = int(max(ends.max(initial=0), max((e for row in spans for _, e in row), default=0))) + 1
    span_row = np.fromiter((r for r, row in enumerate(spans) for _ in row), dtype=np.int64)
    span_arr = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(spans)), dtype=np.int64,
                           count=2 * span_row.size).reshape(-1, 2)
    lo = np.searchsorted(row_of * big + ends, span_row * big + span_arr[:, 0], side="right")
    hi = np.searchsorted(row_of * big + starts, span_row * big + span_arr[:, 1], side="left")
    ok = lo < hi
    delta = np.bincount(lo[ok], minlength=total + 1) - np.bincount(hi[ok], minlength=total + 1)
    mask = (np.cumsum(delta)[:total] > 0).astype(np.int8)
    for r in bad_rows.tolist():
        row_spans = spans[r]
        mask[bounds[r]: bounds[r + 1]] = [int(any(s < se and e > ss for ss, se in row_spans)) for s, e in offsets[r]]
    return mask, bounds


_gc_lock = threading.Lock()
_gc_holders = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection inside (thread-safe, nestable): building many small lists and
    tuples (token ids, offsets, parsed rows) otherwise triggers collections that walk every object
    of the process, which costs a third of a batched encode. Reference counting still frees."""
    global _gc_holders, _gc_was_enabled
    with _gc_lock:
        if _gc_holders == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_holders += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holders -= 1
            if _gc_holders == 0 and _gc_was_enabled:
                gc.enable()


def encode_examples(tokenizer, template: ChatTemplate | None, examples, max_length: int | None = None) -> list[Encoded]:
    """`[encode_example(tokenizer, template, x, max_length) for x in examples]`, batched: the same
    results and the same error (the first failing example's). Every chat row is rendered as
    encode_example renders it (a marked template: one render call for all), all of them are
    tokenised in ONE fast-tokenizer call (with offsets), spans become masks with numpy, and
    truncation is encode_example's. Call it on chunks (e.g. 1000 rows). Any failure in the batch
    (a bad row, a slow tokenizer) reruns the chunk through encode_example, which raises the error."""
    examples = list(examples)
    try:
        with gc_paused():
            return _encode_batch(tokenizer, template, examples, max_length)
    except Exception:  # noqa: BLE001 - the per-example path raises the first failing example's error
        pass
    return [encode_example(tokenizer, template, x, max_length) for x in examples]


def _encode_batch(tokenizer, template, examples: list, max_length) -> list[Encoded]:
    chat = [i for i, x in enumerate(examples) if "messages" in x]
    plain = [i for i, x in enumerate(examples) if "messages" not in x]
    out: list[Encoded | None] = [None] * len(examples)
    if plain:
        if any("text" not in examples[i] for i in plain):
            raise TemplateError("example has neither 'messages' nor 'text'")
        texts = [examples[i]["text"] for i in plain]
        for i, text, ids in zip(plain, texts, tokenizer(texts, add_special_tokens=True)["input_ids"]):
            ids = _eos_appended(tokenizer, ids)
            out[i] = _finish(ids, [1] * len(ids), text, [(0, len(text))] if text else [], max_length, None)
    if chat:
        if template is None:
            raise TemplateError("a chat example needs a chat template")
        rendered = _render_many(template, [examples[i]["messages"] for i in chat], tokenizer)
        texts = [text for text, _ in rendered]
        spans = [row_spans for _, row_spans in rendered]
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                        return_attention_mask=False, return_token_type_ids=False)
        ids_rows, offsets = enc["input_ids"], enc["offset_mapping"]
        mask, bounds = _masks_from_offsets(offsets, spans)
        trained = np.concatenate(([0], np.cumsum(mask, dtype=np.int64)))
        if (trained[bounds[1:]] == trained[bounds[:-1]]).any():
            raise _no_trained_tokens(template)
        mask_list = mask.tolist()
        for k, i in enumerate(chat):
            a, b = int(bounds[k]), int(bounds[k + 1])
            row_offsets = offsets[k]
            out[i] = _finish(list(ids_rows[k]), mask_list[a:b], texts[k], spans[k], max_length,
                             lambda n, o=row_offsets: max((e for _, e in o[:n]), default=0))
    return out


def labels_from(enc: Encoded) -> list[int]:
    return [i if m else -100 for i, m in zip(enc.input_ids, enc.mask)]


def trained_spans_chars(enc: Encoded) -> list[tuple[int, int]]:
    """Trained character spans of enc.text, sorted and merged (for `lorastudio preview --json`)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(enc.spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


# --- checks -------------------------------------------------------------------------------------

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
