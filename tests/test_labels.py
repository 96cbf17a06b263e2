"""Masks checked on the labels the Trainer actually receives (after collation and packing),
including tokenizers whose pad token equals EOS; packing never attends across samples;
the preview (CLI) shows the same trained spans."""

import json
from pathlib import Path

import pytest
import torch

from conftest import lorastudio, shared_assets
from lorastudio.core import config as config_lib
from lorastudio.core import resolve as resolve_lib
from lorastudio.core import labels as labels_lib
from lorastudio.core import train as train_lib


def conversations():
    return [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                      {"role": "assistant", "content": "Hello friend"}]},
        {"messages": [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "Uno"},
                      {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "Dos"},
                      {"role": "user", "content": "Three?"}, {"role": "assistant", "content": "Tres"}]},
        {"messages": [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}]},
    ]


def write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_model_for(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    return LlamaForCausalLM(cfg)


def trainer_batches(tmp_path, tok_dir, rows, packing=False, template="auto", cutoff=256, batch=2, padding_free="auto"):
    cfg = resolve_lib.resolve(config_lib.from_dict({
        "model": {"name_or_path": str(tok_dir)},
        "data": {"sources": [{"path": str(write_jsonl(tmp_path / "d.jsonl", rows))}]},
        "template": {"name": template, "cutoff_len": cutoff, "packing": packing, "padding_free": padding_free},
        "training": {"micro_batch_size": batch, "max_steps": 1},
    }))
    tokenizer, tmpl, _missing, _new = train_lib.load_tokenizer_and_template(cfg)
    train_ds, _eval, stats, _reports, _h = train_lib.prepare_data(cfg, tokenizer, tmpl)
    trainer = train_lib.build_trainer(cfg, tmp_path / "run", tiny_model_for(tokenizer), tokenizer, tmpl,
                                      train_ds, None)
    return tokenizer, tmpl, list(trainer.get_train_dataloader()), stats


@pytest.mark.parametrize("family", ["smollm", "tinyllama-chat", "phi3-mini-instruct", "qwen2.5", "llama2-chat",
                                    "mistral-instruct-v0.3"])
@pytest.mark.parametrize("packing", [False, True])
def test_trainer_labels_are_exactly_the_assistant_turns(tmp_path, family, packing):
    tok_dir = shared_assets() / "tokenizers" / family
    rows = conversations()
    tokenizer, tmpl, batches, stats = trainer_batches(tmp_path, tok_dir, rows, packing=packing)
    if family in ("smollm", "tinyllama-chat", "phi3-mini-instruct"):
        assert tokenizer.pad_token_id == tokenizer.eos_token_id or tokenizer.pad_token == tokenizer.eos_token \
            or family == "phi3-mini-instruct"
    assert stats.kept == 3
    trained_text, n_label_tokens = [], 0
    for b in batches:
        ids, labels = b["input_ids"], b["labels"]
        keep = labels != -100
        assert torch.equal(labels[keep], ids[keep])  # a label is always its own input id
        n_label_tokens += int(keep.sum())
        trained_text.append(tokenizer.decode(ids[keep]))
        if packing:
            assert "attention_mask" not in b and "position_ids" in b
    # expected: the same function the preview uses, per example
    expected = sum(labels_lib.encode_example(tokenizer, tmpl, r, 256).n_trained for r in rows)
    # the padding-free collator also masks each sample's first token (never an assistant token)
    assert n_label_tokens == expected
    joined = " ".join(trained_text)
    for word in ("Hello friend", "Uno", "Dos", "Tres", "yes"):
        assert word in joined
    for word in ("Hi there", "One?", "Three?", "Be brief", "Say yes"):
        assert word not in joined
    eot = tmpl.eot(tokenizer)
    assert joined.count(eot) >= 5 if eot else True  # each assistant turn's end-of-turn token is trained


@pytest.mark.parametrize("padding_free", [False, True])
def test_pretraining_trains_every_token(tmp_path, padding_free):
    rows = [{"text": "Once upon a time there was a tiny model."}, {"text": "It learned to talk."}]
    tokenizer, tmpl, batches, stats = trainer_batches(tmp_path, shared_assets() / "tokenizers" / "qwen2.5", rows,
                                                      padding_free=padding_free)
    total = sum(int((b["labels"] != -100).sum()) for b in batches)
    # every real token, eos included; padding excluded. Padding-free rows also mask each sample's
    # first label (else the previous sample's last token would predict it); padded rows keep it,
    # but the loss's shift never uses a row's first label, so both train the same tokens.
    assert total == stats.tokens - (len(rows) if padding_free else 0)
    if padding_free:
        assert len(batches) == 1 and batches[0]["input_ids"].shape[0] == 1 and "attention_mask" not in batches[0]


def test_truncation_is_counted(tmp_path):
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    rows = conversations() + [long]
    _tok, _tmpl, _batches, stats = trainer_batches(tmp_path, shared_assets() / "tokenizers" / "qwen2.5", rows,
                                                   cutoff=64)
    assert stats.truncated == 1 and stats.no_trained_tokens == 1 and stats.kept == 3


def test_packed_samples_never_attend_to_each_other():
    """Logits of two samples packed in one row (position_ids restart, no attention mask)
    equal the logits of each sample run alone."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         attn_implementation="sdpa")).eval()
    a, b = list(range(5, 17)), list(range(40, 49))
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": a + b, "seq_lengths": [len(a), len(b)]}])
    with torch.no_grad():
        # use_cache=False as in training (load_for_training sets it): HF detects packing only without a cache
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        la = model(input_ids=torch.tensor([a])).logits[0]
        lb = model(input_ids=torch.tensor([b])).logits[0]
    torch.testing.assert_close(out[: len(a)], la, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[len(a):], lb, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_preview_json_on_a_tokenizer_only_folder(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", conversations())
    out = lorastudio("preview", "--model", str(shared_assets() / "tokenizers" / "qwen2.5"), "--data", str(data),
                     "-n", "2", "--json")
    assert out.returncode == 0, out.stderr
    samples = json.loads(out.stdout)
    assert len(samples) == 2 and set(samples[0]) >= {"messages", "text", "trained_spans"}
    s = samples[1]
    trained = [s["text"][a:b] for a, b in s["trained_spans"]]
    assert trained == ["Uno<|im_end|>", "Dos<|im_end|>", "Tres<|im_end|>"]
    assert "You are Qwen" in s["text"]  # the template's default system prompt, untrained


@pytest.mark.slow
def test_preview_text_marks_trained_spans_and_bad_input_is_one_line(tmp_path):
    out = lorastudio("preview", "presets/tiny_smoke.yaml", "-n", "1")
    assert out.returncode == 0 and "[[" in out.stdout and "<|im_end|>]]" in out.stdout
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\x00\x01\x02binary")
    out = lorastudio("preview", "--model", "builtin:tiny", "--data", str(bad))
    assert out.returncode == 2 and "bad.json" in out.stderr and "Traceback" not in out.stderr


def test_gradient_checkpointing_really_active_in_training(tmp_path):
    """HF applies checkpointing only in train mode; the Trainer must see it enabled."""
    from lorastudio.core import model as model_lib

    cfg = resolve_lib.resolve(config_lib.from_dict({"training": {"gradient_checkpointing": True}}))
    tokenizer, _t, _m, _n = train_lib.load_tokenizer_and_template(cfg)
    model = model_lib.load_for_training(cfg, tokenizer)
    model.train()
    base = model.get_base_model()
    assert base.is_gradient_checkpointing
    layers = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers and all(m.training for m in layers)
