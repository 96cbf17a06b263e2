"""Presets catalogue: every preset validates, opens with its command, carries the
estimator's VRAM figure, and its architecture (stored config) builds on the meta device with
resolvable LoRA targets and exactly the estimator's parameter count."""

import json
import re

import pytest

from lorastudio.core import config as C
from lorastudio.core import resolve as resolve_lib
from lorastudio.core import arch as A
from lorastudio.core import estimate as E
from lorastudio.core import model_configs as MC

REAL = {"internlm2_5_7b_qlora_guanaco", "qwen2_5_0_5b_lora", "qwen2_5_0_5b_qlora", "qwen2_5_1_5b_lora",
        "qwen2_5_1_5b_qlora", "qwen2_5_7b_lora", "qwen2_5_7b_qlora", "llama3_1_8b_qlora", "mistral_7b_v0_3_qlora",
        "gemma2_2b_lora", "phi3_mini_lora", "smollm2_360m_full", "tinyllama_chat_lora",
        "deepseek_r1_distill_qwen_1_5b_lora", "qwen2_5_0_5b_pretrain_text"}


def _presets():
    from lorastudio import presets

    return presets.preset_files()


def _real():
    files = _presets()
    return {n: files[n] for n in sorted(REAL)}


def test_catalogue_is_complete_and_tiny_presets_untouched():
    files = _presets()
    assert REAL | {"tiny_demo", "tiny_smoke"} <= set(files)
    for name in ("tiny_demo", "tiny_smoke"):
        assert "estimated peak VRAM" not in files[name].read_text()


@pytest.mark.parametrize("name", sorted(REAL))
def test_preset_validates_opens_with_command_and_vram_comment_matches(name):
    path = _presets()[name]
    text = path.read_text()
    assert text.splitlines()[0] == f"# lorastudio train presets/{name}.yaml"
    cfg = C.load(path)
    est = E.estimate(cfg, detect=False)
    m = re.search(r"^# estimated peak VRAM: ([0-9.]+) GiB \(lorastudio estimate\)$", text, re.M)
    assert m, f"{name}: no VRAM comment"
    assert float(m.group(1)) == est["total_rounded"], (
        f"{name}: comment says {m.group(1)} GiB, estimator says {est['total_rounded']}: regenerate the comment")
    assert MC.lookup(cfg.model.name_or_path) is not None  # a stored architecture


def test_preset_specifics():
    p = {n: C.load(f) for n, f in _real().items()}
    il = p["internlm2_5_7b_qlora_guanaco"]
    assert il.model.trust_remote_code and il.method == "qlora" and il.template.name == "internlm2"
    assert (il.lora.r, il.lora.alpha, il.lora.dropout, il.training.learning_rate) == (64, 16, 0.1, 2e-4)
    assert (il.template.cutoff_len, il.template.packing, il.training.epochs) == (2048, True, 3)
    assert (il.training.micro_batch_size, il.training.grad_accum) == (1, 16) and il.training.sample_prompts
    assert il.data.sources[0].format == "guanaco"
    assert p["phi3_mini_lora"].lora.target_modules == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert p["gemma2_2b_lora"].model.attn_implementation == "eager"
    assert p["smollm2_360m_full"].method == "full"
    assert p["qwen2_5_0_5b_pretrain_text"].data.sources[0].format == "text"
    for name in ("llama3_1_8b_qlora", "gemma2_2b_lora"):
        assert "GATED" in _real()[name].read_text()
    from lorastudio.core import templates

    for name, cfg in p.items():
        assert cfg.template.name == "auto" or cfg.template.name in templates.NAMED, name


def _meta_model(arch):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(MC.hf_config(arch))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL))
def test_architecture_builds_on_meta_targets_resolve_and_count_matches(name):
    """InternLM2 (remote code, not in transformers) is built as a Llama of the same sizes: its
    fused wqkv and w1/w3/w2 hold exactly the parameters of q/k/v_proj and gate/up/down_proj."""
    from peft import LoraConfig, get_peft_model

    cfg = C.load(_presets()[name])
    arch = MC.lookup(cfg.model.name_or_path)
    model = _meta_model(arch)
    n = sum(p.numel() for p in model.parameters())
    assert n == A.param_counts(arch)["total"]
    targets = cfg.lora.target_modules
    if arch.get("stand_in"):
        assert targets == "all-linear"  # names differ between the real model and the stand-in
        arch = {**arch, "model_type": arch["stand_in"]}
    peft_model = get_peft_model(model, LoraConfig(r=cfg.lora.r, target_modules=targets, use_dora=cfg.lora.use_dora))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if cfg.method == "full":
        return
    assert trainable == A.lora_params(arch, targets, cfg.lora.r, cfg.lora.use_dora)[0] > 0


def test_remote_code_needs_the_opt_in(tmp_path):
    """A local stand-in folder with auto_map in config.json is refused without trust_remote_code."""
    import shutil

    from lorastudio.core import model as model_lib
    from lorastudio.core import tiny

    src = tiny.model_path()
    folder = tmp_path / "internlm-like"
    shutil.copytree(src, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_internlm2.InternLM2Config",
                       "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(model_lib.ModelError, match="trust_remote_code"):
        model_lib.load_tokenizer(str(folder))
    tok = model_lib.load_tokenizer(str(folder), trust_remote_code=True)
    assert tok.pad_token is not None
    rc = C.from_dict({"model": {"name_or_path": str(folder)}, "training": {"device": "cpu"}})
    with pytest.raises(model_lib.ModelError, match="trust_remote_code"):
        model_lib.load_for_training(resolve_lib.resolve(rc), tok)
