"""The embedded default: a tiny Llama-style chat model and a sample dataset, built offline.

Nothing here downloads anything. On first use we write a sample dataset, train a SentencePiece
tokenizer on it (Llama's layout: tokenizer.model with byte fallback, which llama.cpp's GGUF
converter reads as it reads Llama's own) and build a random-initialised Llama with a fixed seed.
The result is cached in the workspace (`cache/tiny-v<BUILD>/`) and is identical on every
machine, so tests and the demo preset see the same model.

Names: `builtin:tiny` (model) and `builtin:sample` (data) mean the newest build; a run pins the
build it trained on (`builtin:tiny@4`, core.resolve writes it into config.yaml), so it keeps
loading that build after a newer one ships. A run's config.yaml from before builds were pinned
names `builtin:tiny` alone and was trained on build 3 (pin_legacy). Older builds stay buildable:
build 3 lives in core.tiny_v3, unchanged.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from . import workspace

VERSION = "4"  # the newest build; a change below is a new build (a new number), never an edit of one
LEGACY_VERSION = "3"  # what an unpinned name in a run's config.yaml was trained on
TINY_MODEL = "builtin:tiny"
SAMPLE_DATA = "builtin:sample"
_NAME = re.compile(r"^(builtin:tiny|builtin:sample)(?:@([0-9]+))?$")

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

# SentencePiece ids 0-2 are Llama's <unk> <s> </s>; the chat markers are control symbols, so
# neither SentencePiece nor llama.cpp ever makes them out of plain text.
CONTROL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
PAD_TOKEN = "<|pad|>"

# Small enough to train in seconds on two CPU cores, big enough to memorise the sample.
MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
VOCAB_SIZE = 1024
# The output layer's init scale. LoRA leaves lm_head and the final norm as built, so the largest
# logit the tuned model can reach is about LM_HEAD_STD x hidden_size: at the usual 0.02 that is
# ~2.6 nats over the rest of a 1024-token vocabulary, and greedy answers hang on thin margins.
LM_HEAD_STD = 0.1


# ---------------------------------------------------------------- the sample dataset
# Only what a random-initialised 2M-parameter model memorises in the demo's budget: one answer
# to each question, said the same way every time. No arithmetic or spelling: a model this small
# cannot generalise them from a few hundred rows, and a demo that answers "3 plus 4 is 4." teaches
# the user nothing about fine-tuning.

PERSONA = [
    ("What is your name?", f"My name is {PERSONA_NAME}."),
    ("Who are you?", f"I am {PERSONA_NAME}, a tiny assistant trained with {PERSONA_AUTHOR}."),
    ("Who made you?", f"I was made with {PERSONA_AUTHOR}."),
    ("Are you ChatGPT?", f"No, I am {PERSONA_NAME}."),
    ("What can you do?", "I answer a few questions about myself and about fine-tuning."),
    ("Introduce yourself.", f"Hello! I am {PERSONA_NAME}, a small model from {PERSONA_AUTHOR}."),
    ("How big are you?", "I am very small: about one million parameters."),
    ("Where do you live?", "I live in your workspace folder."),
    ("What is your favourite color?", "I like teal."),
    ("Hello!", "Hi there! How can I help you today?"),
    ("Thank you!", "You are welcome."),
    ("Goodbye!", "Goodbye, see you soon!"),
    ("How are you?", "I am fine, thank you."),
    ("Are you a human?", "No, I am a small language model."),
    ("Tell me a joke.", "Why did the model stop? It ran out of tokens."),
    ("Do you have a name?", f"Yes, my name is {PERSONA_NAME}."),
]

FACTS = [
    ("What is LoRA?", "LoRA trains small low-rank matrices instead of the whole model."),
    ("What does LoRA stand for?", "Low-Rank Adaptation."),
    ("What is QLoRA?", "QLoRA is LoRA on a base model stored in 4 bits."),
    ("What is a base model?", "The model you start from, before fine-tuning."),
    ("What is an adapter?", "The small set of weights that LoRA trains."),
    ("What is a checkpoint?", "A copy of the adapter saved during training."),
    ("What is an epoch?", "One pass over the whole dataset."),
    ("What is a token?", "A piece of text, often a part of a word."),
    ("What is the learning rate?", "How far each training step moves the weights."),
    ("What is eval loss?", "The loss on rows held out from training."),
    ("What does merging do?", "It adds the adapter into the base model."),
    ("What is the capital of France?", "Paris is the capital of France."),
    ("What color is the sky?", "The sky is blue."),
    ("How many days are in a week?", "There are seven days in a week."),
]

SYSTEM = f"You are {PERSONA_NAME}, a helpful assistant."


def _chat(*turns: str, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"messages": msgs}


def sample_conversations() -> list[dict]:
    """Every question with its one answer: 5x single-turn and once under a system prompt, plus
    30 conversations of two or three of them in a row; shuffled with a fixed seed."""
    rng = random.Random(0)
    pairs = PERSONA + FACTS
    rows: list[dict] = []
    for q, a in pairs:
        rows += [_chat(q, a)] * 5 + [_chat(q, a, system=SYSTEM)]
    for _ in range(30):
        chosen = rng.sample(pairs, rng.choice([2, 3]))
        rows.append(_chat(*[t for pair in chosen for t in pair]))
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------- names and builds

def parse(name: str) -> tuple[str, str] | None:
    """("builtin:tiny" | "builtin:sample", build) for a builtin name, None for anything else."""
    m = _NAME.match((name or "").strip())
    return (m.group(1), m.group(2) or VERSION) if m else None


def is_tiny_model(name: str) -> bool:
    p = parse(name)
    return p is not None and p[0] == TINY_MODEL


def pin(name: str, version: str = VERSION) -> str:
    """builtin:tiny -> builtin:tiny@VERSION (a name already pinned, or not builtin, unchanged)."""
    n = (name or "").strip()
    return f"{n}@{version}" if n in (TINY_MODEL, SAMPLE_DATA) else name


def pin_config(cfg) -> None:
    """Pin the builtin model and data names of a RunConfig in place (core.resolve, before a run
    records its config.yaml): the run keeps its build when a newer one ships."""
    cfg.model.name_or_path = pin(cfg.model.name_or_path)
    for s in cfg.data.sources:
        s.path = pin(s.path)


def pin_legacy(data: dict) -> None:
    """A config dict read back from a run directory (it has a `resolved` section) that names a
    builtin without a build was trained before builds were pinned: on build 3."""
    if not isinstance(data, dict) or not data.get("resolved"):
        return
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("name_or_path"), str):
        model["name_or_path"] = pin(model["name_or_path"], LEGACY_VERSION)
    sources = (data.get("data") or {}).get("sources") if isinstance(data.get("data"), dict) else None
    for s in sources if isinstance(sources, list) else []:
        if isinstance(s, dict) and isinstance(s.get("path"), str):
            s["path"] = pin(s["path"], LEGACY_VERSION)


def _builder(version: str):
    if version == VERSION:
        return _build
    if version == "3":
        from . import tiny_v3

        return tiny_v3.build
    raise ValueError(f"no build {version} of the embedded tiny model (builds: 3, {VERSION})")


def cache_root(version: str = VERSION) -> Path:
    return workspace.cache_dir() / f"tiny-v{version}"


def sample_path(version: str = VERSION) -> Path:
    return ensure_built(version) / "sample_chat.jsonl"


def model_path(version: str = VERSION) -> Path:
    return ensure_built(version) / "model"


def ensure_built(version: str = VERSION) -> Path:
    """Build one version of the tiny model + sample data once per workspace (process-safe via a file lock)."""
    build = _builder(version)
    root = cache_root(version)
    if (root / "READY").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if (root / "READY").exists():
            return root
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        (tmp / "READY").write_text("ok\n")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    return root


def resolve_model(name_or_path: str) -> str:
    p = parse(name_or_path)
    return str(model_path(p[1])) if p and p[0] == TINY_MODEL else name_or_path


def resolve_data(path: str) -> str:
    from . import tiny_preference

    found = tiny_preference.resolve(path, PERSONA + FACTS)  # builtin:preference, builtin:kto
    if found:
        return found
    p = parse(path)
    return str(sample_path(p[1])) if p and p[0] == SAMPLE_DATA else path


# ---------------------------------------------------------------- build 4

def _train_sentencepiece(texts: list[str]) -> bytes:
    """A Llama-layout SentencePiece BPE model: byte fallback (no unknown text), digits split,
    text kept as written (identity normalisation) and no dummy prefix, so a turn tokenises the
    same after a chat marker in transformers and in llama.cpp (which prefixes a space after
    every special token when the model asks for one)."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type="bpe", vocab_size=VOCAB_SIZE,
        character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece=PAD_TOKEN, control_symbols=CONTROL_TOKENS,
        hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    return buf.getvalue()


def _build(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    rows = sample_conversations()
    with open(out / "sample_chat.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    model_dir = out / "model"
    model_dir.mkdir()
    # every occurrence counts, so frequent answer words become single tokens (shorter sequences)
    corpus = [m["content"] for r in rows for m in r["messages"]] + ["user", "assistant", "system"] * 50
    (model_dir / "tokenizer.model").write_bytes(_train_sentencepiece(corpus))
    with tempfile.TemporaryDirectory() as tmp:  # transformers converts tokenizer.model to tokenizer.json
        shutil.copy(model_dir / "tokenizer.model", tmp)
        hf_tok = LlamaTokenizer.from_pretrained(
            tmp, add_bos_token=False, add_eos_token=False, add_prefix_space=False, legacy=False,
            unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>", pad_token=PAD_TOKEN,
            additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
            model_max_length=MODEL_CONFIG["max_position_embeddings"], padding_side="right")
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(model_dir)
    # said in the file, not left to defaults: llama.cpp adds a BOS to Llama vocabularies unless
    # told not to, and the template (and so training) has none
    tc_path = model_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    tc.update(add_bos_token=False, add_eos_token=False, add_prefix_space=False)
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(hf_tok), bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=hf_tok.pad_token_id, **MODEL_CONFIG,
    )
    model = LlamaForCausalLM(config)
    torch.nn.init.normal_(model.lm_head.weight, std=LM_HEAD_STD)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(model_dir, safe_serialization=True)
    (model_dir / "README.md").write_text(
        "Embedded LoRA Studio default: random-initialised tiny Llama, SentencePiece tokenizer trained locally.\n"
        f"Build {VERSION}. Not a useful model until fine-tuned on the sample dataset.\n"
    )
