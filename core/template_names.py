"""The named chat templates: Jinja sources with `{% generation %}` markers (what training labels),
their end-of-turn tokens and aliases."""

from __future__ import annotations

from trl import chat_template_utils as trl_templates

from .render import ChatTemplate

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

# Llama 3.1 / 3.3 as shipped, tools left out: a system header always, with the knowledge cut-off and a
# date (date_string, "26 Jul 2024" unless given). 3.2 stamps today's date instead.
def _llama31(today: bool = False) -> str:
    date = ("{%- if strftime_now is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
            "{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}") if today else \
        "{%- set date_string = '26 Jul 2024' %}"
    return r"""
{{- bos_token }}
{%- if not date_string is defined %}""" + date + r"""{%- endif %}
{%- if messages[0].role == 'system' %}
    {%- set system_message = messages[0].content | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: ' + date_string + '\n\n' }}
{{- system_message + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
        {%- generation %}{{- message.content | trim + '<|eot_id|>' }}{%- endgeneration %}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


# Mistral-7B-Instruct v0.1 as shipped: no system role (it raises), "[INST] q [/INST]" and the
# answer straight after, then EOS and a space.
_MISTRAL_V01 = r"""
{{- bos_token }}
{%- for message in messages %}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message.role == 'user' %}
        {{- '[INST] ' + message.content + ' [/INST]' }}
    {%- elif message.role == 'assistant' %}
        {%- generation %}{{- message.content }}{{- eos_token }}{%- endgeneration %}
        {{- ' ' }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

_IM = ["<|im_start|>", "<|im_end|>"]
_LLAMA3 = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

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
    "llama3.1": ChatTemplate("llama3.1", _llama31(), _LLAMA3, "<|eot_id|>"),
    "llama3.2": ChatTemplate("llama3.2", _llama31(today=True), _LLAMA3, "<|eot_id|>"),
    "mistral": ChatTemplate("mistral", _MISTRAL, ["[INST]", "[/INST]"], None, ["[INST]"]),
    "mistral-v0.1": ChatTemplate("mistral-v0.1", _MISTRAL_V01, ["[INST]", "[/INST]"], None, ["[INST]"]),
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
    "llama-3": "llama3", "llama3.0": "llama3", "llama-3.1": "llama3.1", "llama3.3": "llama3.1", "llama-3.3": "llama3.1",
    "llama-3.2": "llama3.2",
    "mistral-v0.3": "mistral", "mistral-instruct": "mistral", "mistral-v0.1": "mistral-v0.1", "mixtral": "mistral-v0.1",
    "gemma2": "gemma", "gemma3": "gemma", "phi-3": "phi3", "phi3-mini": "phi3",
    "tinyllama": "zephyr", "tinyllama-chat": "zephyr", "vicuna_v1.1": "vicuna",
    "deepseek-llm": "deepseek", "raw": "plain", "none": "plain",
}  # fmt: skip
