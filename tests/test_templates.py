"""core.templates against real tokenizers and real chat templates (../shared/assets/tokenizers)."""

from functools import lru_cache

import pytest
from conftest import shared_assets

from lorastudio.core.labels import encode_example, encode_rows, labels_from, trained_spans_chars
from lorastudio.core.template_names import NAMED, QWEN_DEFAULT_SYSTEM, SMOLLM_DEFAULT_SYSTEM
from lorastudio.core.templates import (
    TemplateError,
    missing_special_tokens,
    resolve_template,
    template_warnings,
)

FAMILIES = ["qwen2.5", "llama2-chat", "tinyllama-chat", "mistral-instruct-v0.3", "phi3-mini-instruct", "smollm"]


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
SINGLE = [_u("What is the capital of France?"), _a("Paris is the capital of France.")]
MULTI = [
    _u("Name a red fruit."), _a("A strawberry is red."),
    _u("Name a yellow one."), _a("Bananas are yellow."),
    _u("Thanks, and a green one?"), _a("Limes are green."),
]  # fmt: skip
WITH_SYSTEM = [SYSTEM, *SINGLE]
CONVERSATIONS = {"single": SINGLE, "multi": MULTI, "system": WITH_SYSTEM}


def fresh(name):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_assets() / "tokenizers" / name)


@lru_cache
def _cached(name):
    return fresh(name)


def load(name):
    shared_assets()  # skip (or fail under CI=true) before touching the cache
    return _cached(name)  # read-only use; tests that change a tokenizer take fresh()


def ids_of(result):
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)
    return list(result["input_ids"]) if hasattr(result, "keys") else list(result)


def split_decode(tok, enc):
    trained = tok.decode([i for i, m in zip(enc.input_ids, enc.mask) if m])
    untrained = tok.decode([i for i, m in zip(enc.input_ids, enc.mask) if not m])
    return trained, untrained


def folded(msgs):
    """A system message written into the first user turn, as template.system: fold does."""
    return [{"role": "user", "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]}, *msgs[2:]]


def test_every_template_folder_is_covered():
    import json

    folders = shared_assets() / "tokenizers"
    with_template = {
        d.name for d in folders.iterdir()
        if json.loads((d / "tokenizer_config.json").read_text()).get("chat_template")
    }  # fmt: skip
    assert with_template == set(FAMILIES)


# --- "auto": the tokenizer's own template ------------------------------------------------------

@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_auto_matches_apply_chat_template_and_trains_only_answers(family, conv):
    tok = load(family)
    msgs = CONVERSATIONS[conv]
    template = resolve_template(tok, "auto")
    enc = encode_example(tok, template, {"messages": msgs})
    if family == "mistral-instruct-v0.3" and msgs[0]["role"] == "system":
        msgs = folded(msgs)  # no system role in training conversations: folded, and said so
        assert enc.notes == ["system message folded into the first user turn (the template has no system role)"]

    assert enc.text == tok.apply_chat_template(msgs, tokenize=False)
    assert enc.input_ids == ids_of(tok.apply_chat_template(msgs, tokenize=True))
    assert not enc.truncated and enc.n_trained == sum(enc.mask) > 0

    trained, untrained = split_decode(tok, enc)
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    eot = template.eot(tok)
    assert trained.count(eot) == len(answers)  # every answer's end-of-turn token, once each
    residue = trained
    for answer in answers:
        assert answer in trained and answer not in untrained
        residue = residue.replace(answer, "")
    residue = residue.replace(eot, "").replace(tok.eos_token, "")
    assert residue.strip() == ""  # nothing but answers + end-of-turn tokens is trained
    for m in msgs:
        if m["role"] != "assistant" and m["content"] in enc.text:  # mistral drops the system prompt
            assert m["content"] in untrained


def test_chatml_layout_tokens_are_not_trained():
    tok = load("qwen2.5")
    enc = encode_example(tok, resolve_template(tok, "auto"), {"messages": SINGLE})
    trained = [tok.convert_ids_to_tokens(i) for i, m in zip(enc.input_ids, enc.mask) if m]
    assert trained[-1] == "<|im_end|>"
    assert "assistant" not in trained and "Ċ" not in trained  # header and layout newlines
    assert labels_from(enc) == [i if m else -100 for i, m in zip(enc.input_ids, enc.mask)]
    (start, end), *_ = trained_spans_chars(enc)
    assert enc.text[start:end] == "Paris is the capital of France.<|im_end|>"


@pytest.mark.parametrize(
    "name, family",
    [("qwen", "qwen2.5"), ("smollm", "smollm"), ("llama2", "llama2-chat"), ("zephyr", "tinyllama-chat"),
     ("mistral", "mistral-instruct-v0.3"), ("phi3", "phi3-mini-instruct")],
)  # fmt: skip
def test_named_template_renders_like_the_real_one(name, family):
    tok = load(family)
    for msgs in [*CONVERSATIONS.values(), [SYSTEM, _u("hi")], [_u("hi")]]:
        prompt = msgs[-1]["role"] == "user"
        assert NAMED[name].render(msgs, prompt, tok) == tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=prompt
        )


@pytest.mark.parametrize(
    "name, family, extra_tokens",
    [("qwen", "qwen2.5", []), ("chatml", "smollm", []), ("llama2", "llama2-chat", []),
     ("mistral", "mistral-instruct-v0.3", []), ("zephyr", "tinyllama-chat", []),
     ("llama3", "qwen2.5", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
     ("gemma", "qwen2.5", ["<start_of_turn>", "<end_of_turn>"])],
)  # fmt: skip
def test_mask_equals_transformers_assistant_masks(name, family, extra_tokens):
    tok = fresh(family) if extra_tokens else load(family)
    if extra_tokens:
        tok.add_special_tokens({"additional_special_tokens": extra_tokens})
        if name == "llama3":
            tok.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    template = resolve_template(tok, name)
    for msgs in CONVERSATIONS.values():
        enc = encode_example(tok, template, {"messages": msgs})
        if name == "mistral" and msgs[0]["role"] == "system":
            msgs = folded(msgs)  # v0.3 drops a system message from a conversation ending with an answer
        out = tok.apply_chat_template(
            msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=template.source
        )
        assert list(out["input_ids"]) == enc.input_ids
        assert list(out["assistant_masks"]) == enc.mask


def test_aliases_and_unknown_names():
    tok = load("qwen2.5")
    assert resolve_template(tok, "qwen2.5").name == "qwen"
    assert resolve_template(tok, "ChatML").source == NAMED["chatml"].source
    with pytest.raises(TemplateError, match="unknown template"):
        resolve_template(tok, "no-such-family")


# --- warnings and special tokens ---------------------------------------------------------------

def test_mistral_folds_the_system_message_or_refuses_the_row():
    tok = load("mistral-instruct-v0.3")
    template = resolve_template(tok, "auto")
    assert any("no system role" in w and "folded into the first user turn" in w for w in template_warnings(tok, template))
    # folded, as v0.3 itself renders a system prompt at inference: before the (last) user turn
    enc = encode_example(tok, template, {"messages": WITH_SYSTEM})
    assert enc.text.startswith("<s>[INST] " + SYSTEM["content"] + "\n\n")
    refusing = resolve_template(tok, "mistral")
    refusing.system = "refuse"
    with pytest.raises(TemplateError, match="no system role, so this row's system message would be lost"):
        encode_example(tok, refusing, {"messages": WITH_SYSTEM})
    assert encode_example(tok, refusing, {"messages": SINGLE}).n_trained > 0  # rows without one are fine


@pytest.mark.parametrize("family, default", [("qwen2.5", QWEN_DEFAULT_SYSTEM), ("smollm", SMOLLM_DEFAULT_SYSTEM)])
def test_default_system_prompt_warning(family, default):
    tok = load(family)
    for name in ("auto", family.split(".")[0]):
        warnings = template_warnings(tok, resolve_template(tok, name))
        assert any("default system prompt" in w and default[:60] in w for w in warnings), warnings
    assert not any("default system" in w for w in template_warnings(tok, resolve_template(tok, "chatml")))


def test_other_template_than_the_models_own_warns():
    tok = load("qwen2.5")
    assert any("differently from the model's own" in w for w in template_warnings(tok, resolve_template(tok, "chatml")))
    qwen = template_warnings(tok, resolve_template(tok, "qwen"))
    assert not any("differently from the model's own chat template;" in w for w in qwen)
    # Qwen2.5's own template renders tools; the named one does not
    assert any("renders reasoning or tool calls differently" in w for w in qwen)


def test_gpt2_has_no_template_and_lacks_chatml_tokens():
    tok = load("gpt2")
    with pytest.raises(TemplateError, match="model has no chat template; pick a named template"):
        resolve_template(tok, "auto")
    chatml = resolve_template(tok, "chatml")
    assert missing_special_tokens(tok, chatml) == ["<|im_start|>", "<|im_end|>"]
    assert any("lacks the template's special tokens" in w for w in template_warnings(tok, chatml))
    assert missing_special_tokens(tok, resolve_template(tok, "plain")) == []


def test_untrained_eos_warns():
    tok = load("qwen2.5")
    # answers marked without their <|im_end|>
    source = NAMED["chatml"].source.replace("message.content + '<|im_end|>' }}", "message.content }}{{- '<|im_end|>' }}")
    source = source.replace("{%- endgeneration %}\n        {{- '\\n' }}", "{%- endgeneration %}{{- '<|im_end|>\\n' }}")
    source = source.replace("{{- '<|im_end|>' }}{%- endgeneration %}", "{%- endgeneration %}")
    template = resolve_template(tok, "custom", source)
    enc = encode_example(tok, template, {"messages": SINGLE})
    assert enc.text == NAMED["chatml"].render(SINGLE, tokenizer=tok)
    assert any("not trained" in w for w in template_warnings(tok, template))


@pytest.mark.parametrize("name", NAMED)
def test_every_named_template_with_qwen_tokenizer(name):
    tok = fresh("qwen2.5")
    template = NAMED[name]
    assert template.has_markers
    missing = missing_special_tokens(tok, template)
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    assert missing_special_tokens(tok, template) == []
    msgs = [SYSTEM, _u("Hi there."), _a("Hello! How can I help?"), _u("Tell me a joke."), _a("Why not.")]
    enc = encode_example(tok, template, {"messages": msgs})
    assert enc.n_trained > 0
    eot_ids = tok.encode(template.eot(tok), add_special_tokens=False)
    assert len(eot_ids) == 1
    trained = [i for i, m in zip(enc.input_ids, enc.mask) if m]
    assert trained.count(eot_ids[0]) == 2
    assert template.render(msgs[1:2] if name == "mistral-v0.1" else msgs[:2], add_generation_prompt=True, tokenizer=tok)


# --- custom templates: sandbox and errors ------------------------------------------------------

def test_sandbox_refuses_unsafe_access():
    template = resolve_template(None, "custom", "{{ ''.__class__.__mro__ }}")
    with pytest.raises(TemplateError, match="unsafe"):
        template.render(SINGLE)


def test_syntax_error_reports_line():
    with pytest.raises(TemplateError, match="line 2"):
        resolve_template(None, "custom", "{% for m in messages %}\n{{ m.content }\n{% endfor %}")


def test_raising_template_reports_message():
    template = resolve_template(None, "custom", "{{ raise_exception('x-boom: roles must alternate') }}")
    with pytest.raises(TemplateError, match="x-boom: roles must alternate"):
        template.render(SINGLE)


def test_custom_template_marking_nothing_is_an_error():
    tok = load("qwen2.5")
    users_only = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content + '\\n' }}{% endif %}{% endfor %}"
    template = resolve_template(tok, "custom", users_only)
    with pytest.raises(TemplateError, match="marks no assistant tokens"):
        encode_example(tok, template, {"messages": SINGLE})


def test_unmarked_custom_template_uses_prefix_diff():
    tok = load("qwen2.5")
    unmarked = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    template = resolve_template(tok, "custom", unmarked)
    assert not template.has_markers and template.eot_token == "<|im_end|>"
    enc = encode_example(tok, template, {"messages": MULTI})
    assert enc.mask == encode_example(tok, NAMED["chatml"], {"messages": MULTI}).mask


def test_auto_falls_back_to_prefix_diff_or_asks_for_a_named_template():
    tok = fresh("smollm")
    tok.chat_template = (  # unknown to TRL and to NAMED (another default system prompt)
        "{% if messages[0].role != 'system' %}{{ '<|im_start|>system\\nBe nice.<|im_end|>\\n' }}{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    template = resolve_template(tok, "auto")
    assert not template.has_markers and template.eot_token == "<|im_end|>"
    assert any('default system prompt when a conversation has none: "Be nice."' in w for w in template_warnings(tok, template))
    enc = encode_example(tok, template, {"messages": MULTI})
    assert enc.input_ids == ids_of(tok.apply_chat_template(MULTI, tokenize=True))
    trained, untrained = split_decode(tok, enc)
    assert trained == "A strawberry is red.<|im_end|>Bananas are yellow.<|im_end|>Limes are green.<|im_end|>"

    # reasoning stripped from earlier answers (as Qwen3, DeepSeek-R1, GLM do): not prefix-preserving,
    # so each answer is trained in its own row, rendered as the template renders it then
    tok.chat_template = (
        "{%- for m in messages %}{%- if m.role == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\\n' + m.content.split('</think>')[-1].lstrip() + '<|im_end|>\\n' }}"
        "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    template = resolve_template(tok, "auto")
    convo = [m if m["role"] == "user" else {**m, "content": f"<think>why {k}</think>" + m["content"]}
             for k, m in enumerate(MULTI)]
    found = encode_rows(tok, template, {"messages": convo})
    answers = [i for i, m in enumerate(convo) if m["role"] == "assistant"]
    assert len(found) == len(answers) == 3
    for enc, i in zip(found, answers):
        assert enc.text == tok.apply_chat_template(convo[: i + 1], tokenize=False)
        trained, _ = split_decode(tok, enc)
        assert trained == convo[i]["content"] + "<|im_end|>"  # that answer (its reasoning too) only
        assert enc.notes == ["one row per answer (the template renders earlier turns differently as the "
                             "conversation grows)"]
    template.train_on = "last"
    assert [e.text for e in encode_rows(tok, template, {"messages": convo})] == [found[-1].text]
    template.train_on, template.reasoning = "all", "strip"  # no reasoning left: one row, every answer
    (enc,) = encode_rows(tok, template, {"messages": convo})
    assert split_decode(tok, enc)[0] == "".join(m["content"] + "<|im_end|>" for m in MULTI if m["role"] == "assistant")
    template.reasoning = "keep"  # it strips reasoning even when written into the answer: refused, saying why
    with pytest.raises(TemplateError, match="removes the reasoning of earlier answers even when it is written"):
        encode_rows(tok, template, {"messages": convo})


@pytest.mark.parametrize("family", ["qwen2.5", "llama2-chat"])  # a marked template, and prefix diff
def test_train_on_last_trains_only_the_final_answer(family):
    tok = load(family)
    template = resolve_template(tok, "auto", train_on="last")
    (enc,) = encode_rows(tok, template, {"messages": MULTI})
    trained, untrained = split_decode(tok, enc)
    answers = [m["content"] for m in MULTI if m["role"] == "assistant"]
    assert answers[-1] in trained and not any(a in trained for a in answers[:-1])
    assert all(a in untrained for a in answers[:-1])
    assert enc.text == tok.apply_chat_template(MULTI, tokenize=False)


# --- pretraining text and truncation -----------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama2-chat"])
def test_pretraining_text_is_all_trained_with_eos(family):
    tok = load(family)
    enc = encode_example(tok, None, {"text": "The quick brown fox jumps over the lazy dog."})
    expected = tok("The quick brown fox jumps over the lazy dog.", add_special_tokens=True)["input_ids"]
    assert enc.input_ids == [*expected, tok.eos_token_id]
    assert enc.mask == [1] * len(enc.input_ids) and enc.n_trained == len(enc.input_ids)
    assert labels_from(enc) == enc.input_ids
    # already ends with EOS: not doubled
    enc = encode_example(tok, None, {"text": "Done." + tok.eos_token})
    assert enc.input_ids[-1] == tok.eos_token_id and enc.input_ids[-2] != tok.eos_token_id


def test_truncation_keeps_the_head():
    tok = load("qwen2.5")
    template = resolve_template(tok, "auto")
    long_user = [_u("word " * 200), _a("Short answer.")]
    enc = encode_example(tok, template, {"messages": long_user}, max_length=64)
    assert enc.truncated and len(enc.input_ids) == 64 and enc.n_trained == 0  # counted by caller, no raise
    assert trained_spans_chars(enc) == []

    full = encode_example(tok, template, {"messages": MULTI})
    cut = encode_example(tok, template, {"messages": MULTI}, max_length=len(full.input_ids) - 3)
    assert cut.truncated and 0 < cut.n_trained < full.n_trained
    assert cut.input_ids == full.input_ids[: len(cut.input_ids)] and cut.text == full.text
    assert trained_spans_chars(cut)[-1][1] < trained_spans_chars(full)[-1][1]


# --- encode_examples: the batched labelling function -------------------------------------------

def _batch_rows(n=60, seed=0):
    """Chat rows of every shape: system or not, one to three exchanges, short and long answers,
    non-ASCII and extra whitespace (offsets and the span trimming)."""
    import random

    rng = random.Random(seed)
    words = "the a cat dog sun tree book fish bird rain milk star red blue big small fast slow".split()
    extra = ["naïve café", "日本語 テキスト", "emoji 🙂 ok", "  padded  ", "tab\tand\nnewline", "<b>html</b>"]
    rows = []
    for i in range(n):
        msgs = [SYSTEM] if i % 4 == 0 else []
        for _ in range(rng.choice([1, 1, 2, 3])):
            msgs.append(_u(" ".join(rng.choices(words + extra, k=rng.randint(1, 25)))))
            msgs.append(_a(" ".join(rng.choices(words + extra, k=rng.randint(1, 60)))))
        rows.append({"messages": msgs})
    return rows + [{"messages": m} for m in CONVERSATIONS.values()]


def _text_rows():
    return [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "naïve café 🙂\n\nsecond paragraph"},
            {"text": "word " * 300}, {"text": "x"}]


def _assert_batch_equals_single(tok, template, rows, max_lengths=(None, 16, 48, 100_000)):
    from lorastudio.core.labels import _encode_batch, encode_examples

    for max_length in max_lengths:
        single = [encode_example(tok, template, x, max_length) for x in rows]
        assert encode_examples(tok, template, rows, max_length) == single, max_length
        # the batched path itself, not its per-example fallback
        assert _encode_batch(tok, template, rows, max_length) == single, max_length


def test_encode_examples_matches_encode_example_tiny():
    from lorastudio.core import model as model_lib

    tok = model_lib.load_tokenizer("builtin:tiny")
    rows = _batch_rows()
    for name in ("auto", "chatml", "llama3", "plain", "alpaca"):
        template = resolve_template(tok, name)
        grown = model_lib.load_tokenizer("builtin:tiny")  # as training builds it: missing tokens added
        grown.add_special_tokens({"additional_special_tokens": missing_special_tokens(grown, template)})
        _assert_batch_equals_single(tok, template, rows)
        _assert_batch_equals_single(grown, template, rows)
    _assert_batch_equals_single(tok, None, _text_rows())
    _assert_batch_equals_single(tok, resolve_template(tok, "chatml"), _text_rows())


@pytest.mark.parametrize("family", [*FAMILIES, "gpt2"])
def test_encode_examples_matches_encode_example_families(family):
    tok = load(family)
    rows = _batch_rows(40, seed=len(family))
    templates_ = ["auto"] if family in FAMILIES else []
    for name in [*templates_, "chatml", "plain"]:
        _assert_batch_equals_single(tok, resolve_template(tok, name), rows, (None, 24, 200))
    _assert_batch_equals_single(tok, None, _text_rows(), (None, 8))


def test_encode_examples_unmarked_template_uses_the_prefix_diff():
    tok = load("qwen2.5")
    unmarked = NAMED["chatml"].source.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    template = resolve_template(tok, "custom", unmarked)
    assert not template.has_markers
    _assert_batch_equals_single(tok, template, _batch_rows(20), (None, 32))


def test_encode_examples_raises_the_first_failing_examples_error():
    from lorastudio.core.labels import encode_examples

    tok = load("qwen2.5")
    chatml = resolve_template(tok, "chatml")
    drops = resolve_template(tok, "custom", "{%- for m in messages if m.role == 'user' %}{{ m.content }}\n{%- endfor %}")
    good = {"messages": SINGLE}
    cases = [
        (chatml, [good, {"prompt": "no known key"}, {"messages": "not a list"}]),
        (None, [{"text": "fine"}, good]),
        (drops, [good, good]),
    ]
    for template, rows in cases:
        with pytest.raises(Exception) as single:
            [encode_example(tok, template, x) for x in rows]
        with pytest.raises(type(single.value)) as batched:
            encode_examples(tok, template, rows)
        assert str(batched.value) == str(single.value)
    assert encode_examples(tok, chatml, []) == []


def test_masks_from_offsets_handles_rows_with_unordered_offsets():
    """The searchsorted fast path needs non-decreasing offsets per row; other rows use the formula."""
    import random

    from lorastudio.core.labels import _masks_from_offsets

    rng = random.Random(1)
    offsets, spans = [], []
    for r in range(50):
        n = rng.randint(0, 30)
        starts = sorted(rng.randint(0, 200) for _ in range(n))
        row = [(s, s + rng.randint(0, 6)) for s in starts]
        if r % 5 == 0:
            rng.shuffle(row)  # unordered
        if r % 7 == 0:
            row = [(0, 0)] + row  # a zero-width token
        offsets.append(row)
        spans.append(sorted((a, a + rng.randint(1, 40)) for a in rng.sample(range(200), rng.randint(0, 3))))
    mask, bounds = _masks_from_offsets(offsets, spans)
    for r, (row, row_spans) in enumerate(zip(offsets, spans)):
        expected = [int(any(s < se and e > ss for ss, se in row_spans)) for s, e in row]
        assert mask[bounds[r]: bounds[r + 1]].tolist() == expected


def test_dataset_tokenize_batches_as_encode_example_does():
    from datasets import Dataset

    from lorastudio.core import dataset as dataset_lib

    tok = load("qwen2.5")
    template = resolve_template(tok, "auto")
    long = {"messages": [_u("word " * 200), _a("Short answer.")]}  # nothing left to train at 64
    rows = (_batch_rows(30) + [long]) * 40  # > one CHUNK
    ds, stats = dataset_lib.tokenize(Dataset.from_list(rows), tok, template, 64)
    encs = [encode_example(tok, template, x, 64) for x in Dataset.from_list(rows)]
    kept = [e for e in encs if e.n_trained]
    assert ds["input_ids"] == [e.input_ids for e in kept]
    assert ds["labels"] == [labels_from(e) for e in kept]
    assert stats == dataset_lib.TokenStats(
        samples=len(rows), kept=len(kept), truncated=sum(e.truncated for e in encs),
        no_trained_tokens=len(encs) - len(kept), tokens=sum(len(e.input_ids) for e in kept),
        trained_tokens=sum(e.n_trained for e in kept), lengths=[len(e.input_ids) for e in kept], rows=len(encs))
