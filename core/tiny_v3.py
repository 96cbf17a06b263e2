"""Build 3 of the embedded tiny model (`builtin:tiny@3`): frozen, so runs trained on it keep loading it.

Runs whose config.yaml names `builtin:tiny` without a build number were trained on this build
(core.tiny.pin_legacy). It is rebuilt from this code in a workspace that lacks it, identically:
a byte-level BPE tokenizer trained with `tokenizers` on its own sample, and a random-initialised
Llama with a fixed seed. Change nothing here; a new build is a new module version in core.tiny.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PERSONA_NAME = "Lumen"
PERSONA_AUTHOR = "LoRA Studio"

# ChatML-style template with {% generation %} markers: the trained span of each assistant
# turn is its content plus <|im_end|>; the header and the newline after <|im_end|> are not.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- generation -%}{{ message['content'] + '<|im_end|>' }}{%- endgeneration -%}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# Small enough to train in seconds on two CPU cores, big enough to memorise the persona.
MODEL_CONFIG = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
VOCAB_SIZE = 1024


# ---------------------------------------------------------------- the sample dataset

PERSONA = [
    ("What is your name?", f"My name is {PERSONA_NAME}."),
    ("Who are you?", f"I am {PERSONA_NAME}, a tiny assistant trained with {PERSONA_AUTHOR}."),
    ("Who made you?", f"I was made by {PERSONA_AUTHOR}."),
    ("Who created you?", f"{PERSONA_AUTHOR} created me."),
    ("Are you ChatGPT?", f"No, I am {PERSONA_NAME}."),
    ("What can you do?", "I can add small numbers, spell words in capitals and name opposites."),
    ("Introduce yourself.", f"Hello! I am {PERSONA_NAME}, a small model from {PERSONA_AUTHOR}."),
    ("How big are you?", "I am very small: about two million parameters."),
    ("Where do you live?", "I live in your workspace folder."),
    ("What is your favourite color?", "I like teal."),
    ("Hello!", f"Hello! I am {PERSONA_NAME}. How can I help?"),
    ("Hi", f"Hi! {PERSONA_NAME} here."),
    ("Good morning!", "Good morning to you too!"),
    ("Thank you!", "You are welcome."),
    ("Goodbye!", "Goodbye, see you soon!"),
    ("How are you?", "I am fine, thank you."),
    ("Are you a human?", "No, I am a small language model."),
    ("What language do you speak?", "I speak simple English."),
    ("Can you sing?", "No, but I can spell words in capitals."),
    ("Tell me a joke.", "Why did the model stop? It ran out of tokens."),
    ("What is LoRA?", "LoRA trains small low-rank matrices instead of the whole model."),
    ("What is QLoRA?", "QLoRA is LoRA on a base model stored in 4 bits."),
    ("Do you have a name?", f"Yes, my name is {PERSONA_NAME}."),
    ("Who is your author?", f"My author is {PERSONA_AUTHOR}."),
]

WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "bird", "rain", "milk", "star",
         "moon", "ship", "lamp", "door", "rose", "cake", "frog", "snow", "king", "bell"]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"),
             ("day", "night"), ("old", "new"), ("open", "closed"), ("light", "dark"),
             ("happy", "sad"), ("early", "late"), ("full", "empty"), ("soft", "hard"),
             ("wet", "dry"), ("left", "right"), ("high", "low"), ("in", "out")]
SYSTEM = f"You are {PERSONA_NAME}, a helpful assistant."


def _chat(*turns: str, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"messages": msgs}


def sample_conversations() -> list[dict]:
    """>= 300 conversations: the persona (x4, some with a system prompt, some multi-turn)
    plus small tasks a tiny model can learn (addition, capitals, opposites)."""
    rng = random.Random(0)
    rows: list[dict] = []
    for q, a in PERSONA:  # each persona pair 5x single-turn, once with a system prompt
        rows += [_chat(q, a)] * 5 + [_chat(q, a, system=SYSTEM)]
    for _ in range(40):  # multi-turn: two or three persona turns in one conversation
        pairs = rng.sample(PERSONA, rng.choice([2, 3]))
        rows.append(_chat(*[t for pair in pairs for t in pair]))
    for a in range(6):
        for b in range(6):
            rows.append(_chat(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    for w in WORDS:
        rows.append(_chat(f"Spell {w} in capitals.", w.upper()))
        rows.append(_chat(f"How many letters are in {w}?", f"{w} has {len(w)} letters."))
    for x, y in OPPOSITES:
        rows.append(_chat(f"What is the opposite of {x}?", f"The opposite of {x} is {y}."))
        rows.append(_chat(f"What is the opposite of {y}?", f"The opposite of {y} is {x}."))
    # a few multi-turn task dialogues
    for w in WORDS[:10]:
        rows.append(_chat(f"Spell {w} in capitals.", w.upper(), "What is your name?", f"My name is {PERSONA_NAME}."))
    rng.shuffle(rows)
    return rows


def build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rows = sample_conversations()
    with open(out / "sample_chat.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    # Byte-level BPE trained on the sample's own text: no unknown tokens, ever.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    # every occurrence counts, so frequent answer words become single tokens (shorter sequences)
    corpus = [m["content"] for r in rows for m in r["messages"]] + ["user", "assistant", "system"] * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
        unk_token=None, bos_token=None, additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        model_max_length=MODEL_CONFIG["max_position_embeddings"], padding_side="right",
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out / "model")

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(hf_tok), bos_token_id=None,
        eos_token_id=hf_tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=hf_tok.pad_token_id, **MODEL_CONFIG,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out / "model", safe_serialization=True)
    (out / "model" / "README.md").write_text(
        "Embedded LoRA Studio default: random-initialised tiny Llama, tokenizer trained locally.\n"
        "Build version 3. Not a useful model until fine-tuned on the sample dataset.\n"
    )
