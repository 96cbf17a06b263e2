"""Random-init models of real architectures, saved as safetensors with the embedded tokenizer
(ids stay below the vocab), for GPU benchmarks that have no hub: python bench/make_random_model.py SHAPE OUT"""

import shutil
import sys
from pathlib import Path

import torch

SHAPES = {  # name: (config class, kwargs) — the real published shapes
    "qwen2.5-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                          num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                          tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2.5-1.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                          num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                          tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2.5-7b": ("Qwen2Config", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                        tie_word_embeddings=False, rope_theta=1e6)),
    "llama3.1-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                         tie_word_embeddings=False, rope_theta=5e5)),
}


def main(shape: str, out: str) -> None:
    import transformers

    from lorastudio.core import tiny

    if (Path(out) / "config.json").exists():  # built earlier in this call (or on a still-warm machine)
        print(f"{out}: already built")
        return
    cls_name, kw = SHAPES[shape]
    cfg = getattr(transformers, cls_name)(max_position_embeddings=32768, eos_token_id=2, pad_token_id=3,
                                          bos_token_id=None, **kw)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    src = tiny.model_path()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / f, Path(out) / f)
    print(f"built {out}: {shape}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M params")


if __name__ == "__main__":
    main(*sys.argv[1:3])
