"""Stored architecture configs of the model families the presets use (no hub needed).

Each entry holds the published config.json values that decide memory and parameter count
(vocabulary, hidden size, layers, attention heads and KV heads, MLP width, tied embeddings, and
family specifics such as Gemma-2's softcapping or Phi-3's fused projections). `core.estimate`
counts parameters from these dicts; `hf_config()` turns one into a transformers config so a test
(and bench/estimate_validate.py) can build the real shape on the meta device and check the count.

InternLM2 needs remote code (it is not in transformers): `stand_in: llama` builds a Llama of the
same sizes instead (its wqkv/wo/w1/w3/w2 have exactly the shapes of Llama's q/k/v/o/gate/up/down).
Pure data: importing this module loads no torch.
"""

from __future__ import annotations

# Linear layers of one decoder layer, per family: name -> (in_features, out_features) as a
# function of the config. "all-linear" in PEFT targets all of them (never lm_head).
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHI3_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
INTERNLM2_LINEARS = ("wqkv", "wo", "w1", "w3", "w2")

ARCHS: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
        rms_norm_eps=1e-6, max_position_embeddings=32768, qkv_bias=True),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
        rms_norm_eps=1e-6, max_position_embeddings=32768, qkv_bias=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=1e6,
        rms_norm_eps=1e-6, max_position_embeddings=32768, qkv_bias=True),
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=5e5,
        rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)),
    "mistralai/Mistral-7B-Instruct-v0.3": dict(
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=1e6,
        rms_norm_eps=1e-5, max_position_embeddings=32768),
    "google/gemma-2-2b-it": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, tie_word_embeddings=True, rope_theta=1e4,
        rms_norm_eps=1e-6, max_position_embeddings=8192, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, query_pre_attn_scalar=256, sliding_window=4096,
        hidden_activation="gelu_pytorch_tanh", norms_per_layer=4),
    "microsoft/Phi-3-mini-4k-instruct": dict(
        model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False, rope_theta=1e4,
        rms_norm_eps=1e-5, max_position_embeddings=4096, sliding_window=2047, fused_qkv=True, fused_gate_up=True),
    "HuggingFaceTB/SmolLM2-360M-Instruct": dict(
        model_type="llama", vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
        num_attention_heads=15, num_key_value_heads=5, tie_word_embeddings=True, rope_theta=1e5,
        rms_norm_eps=1e-5, max_position_embeddings=8192),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": dict(
        model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=1e4,
        rms_norm_eps=1e-5, max_position_embeddings=2048),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e4,
        rms_norm_eps=1e-6, max_position_embeddings=131072, qkv_bias=True),
    "internlm/internlm2_5-7b-chat": dict(
        model_type="internlm2", vocab_size=92544, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=1e6,
        rms_norm_eps=1e-5, max_position_embeddings=32768, fused_qkv=True, remote_code=True, stand_in="llama"),
}
# Base (non-instruct) checkpoints share their instruct sibling's shape.
ARCHS["Qwen/Qwen2.5-0.5B"] = ARCHS["Qwen/Qwen2.5-0.5B-Instruct"]
ARCHS["Qwen/Qwen2.5-1.5B"] = ARCHS["Qwen/Qwen2.5-1.5B-Instruct"]
ARCHS["Qwen/Qwen2.5-7B"] = ARCHS["Qwen/Qwen2.5-7B-Instruct"]
ARCHS["meta-llama/Llama-3.1-8B"] = ARCHS["meta-llama/Llama-3.1-8B-Instruct"]

_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings", "rope_theta", "rms_norm_eps",
            "max_position_embeddings", "rope_scaling", "attn_logit_softcapping", "final_logit_softcapping",
            "query_pre_attn_scalar", "sliding_window", "hidden_activation")
_CONFIG_CLASS = {"qwen2": "Qwen2Config", "llama": "LlamaConfig", "mistral": "MistralConfig",
                 "gemma2": "Gemma2Config", "phi3": "Phi3Config"}


def lookup(name_or_path: str) -> dict | None:
    """The stored architecture for a hub id (case-insensitive), else None."""
    if name_or_path in ARCHS:
        return ARCHS[name_or_path]
    low = {k.lower(): v for k, v in ARCHS.items()}
    return low.get(name_or_path.strip().lower())


def from_config_json(cfg: dict) -> dict:
    """An architecture dict from a model folder's config.json (the same keys as ARCHS)."""
    text = cfg.get("text_config") or cfg
    mt = text.get("model_type") or cfg.get("model_type") or "llama"
    arch = {k: text[k] for k in _HF_KEYS if k in text and text[k] is not None}
    arch["model_type"] = mt
    arch.setdefault("num_key_value_heads", arch.get("num_attention_heads"))
    arch.setdefault("tie_word_embeddings", bool(cfg.get("tie_word_embeddings", False)))
    if mt in ("qwen2",):
        arch["qkv_bias"] = True
    if text.get("attention_bias"):
        arch["qkv_bias"] = arch["o_bias"] = True
    if mt == "phi3":
        arch.update(fused_qkv=True, fused_gate_up=True)
    if mt == "internlm2":
        arch.update(fused_qkv=True, remote_code=True, stand_in="llama")
    if mt in ("gemma2", "gemma3", "gemma3_text"):
        arch["norms_per_layer"] = 4
    return arch


def linear_names(arch: dict) -> tuple[str, ...]:
    mt = arch.get("model_type")
    if mt == "phi3":
        return PHI3_LINEARS
    if mt == "internlm2":
        return INTERNLM2_LINEARS
    return LLAMA_LINEARS


def hf_config(arch: dict):
    """A transformers config of this architecture (InternLM2: a Llama-shaped stand-in)."""
    import transformers

    mt = arch.get("stand_in") or arch["model_type"]
    cls = getattr(transformers, _CONFIG_CLASS[mt])
    kw = {k: arch[k] for k in _HF_KEYS if k in arch}
    if mt == "phi3":
        kw["pad_token_id"] = 0  # Phi3Config's default pad id (32000) suits only the real vocab
    return cls(**kw)
