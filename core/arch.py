"""Architecture arithmetic: the sizes of a model (stored for the preset models, or read from a
local folder's config.json) and the exact parameter counts of its layers and of a LoRA on them.
No torch, no weights read."""

from __future__ import annotations

from pathlib import Path


class EstimateError(ValueError):
    """No usable architecture for a model (the estimate says why instead of a number)."""


def arch_for(name_or_path: str) -> dict:
    """The architecture dict for a hub id (stored), a local folder (its config.json) or builtin:tiny."""
    from . import model_configs

    arch = model_configs.lookup(name_or_path)
    if arch is not None:
        return arch
    from . import tiny

    path = Path(name_or_path).expanduser()
    if tiny.is_tiny_model(name_or_path):  # builtin:tiny, or a run's pinned builtin:tiny@N
        path = Path(tiny.resolve_model(name_or_path))
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        from . import safe_io

        try:
            data = safe_io.read_json(cfg_file)
            arch = model_configs.from_config_json(data)
            dims(arch)  # every size it needs, as an int
            if not all(isinstance(v, int) and 0 < v < 10**7 for k, v in arch.items() if k in _SIZES):
                raise TypeError("sizes")
            return arch
        except (safe_io.FileProblem, AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError):
            raise EstimateError(f"{cfg_file}: not a usable model config (sizes missing or not numbers)") from None
    raise EstimateError(f"no stored architecture for {name_or_path!r} and no config.json there; "
                        "pass a local model folder or one of the preset models")


_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
          "num_key_value_heads", "head_dim")


def dims(arch: dict) -> dict:
    H = arch["hidden_size"]
    nh = arch["num_attention_heads"]
    nkv = arch.get("num_key_value_heads") or nh
    hd = arch.get("head_dim") or H // nh
    return dict(H=H, I=arch["intermediate_size"], L=arch["num_hidden_layers"], V=arch["vocab_size"],
                nh=nh, nkv=nkv, hd=hd, Hq=nh * hd, Hkv=nkv * hd)


def linear_shapes(arch: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one decoder layer, by its module name."""
    from . import model_configs

    d = dims(arch)
    H, I, Hq, Hkv = d["H"], d["I"], d["Hq"], d["Hkv"]
    names = model_configs.linear_names(arch)
    if arch.get("model_type") == "phi3":
        return dict(zip(names, [(H, Hq + 2 * Hkv), (Hq, H), (H, 2 * I), (I, H)]))
    if arch.get("model_type") == "internlm2":
        return dict(zip(names, [(H, Hq + 2 * Hkv), (Hq, H), (H, I), (H, I), (I, H)]))
    return dict(zip(names, [(H, Hq), (H, Hkv), (H, Hkv), (Hq, H), (H, I), (H, I), (I, H)]))


def param_counts(arch: dict) -> dict:
    """Exact parameter counts: embedding, per-layer linears (+ biases), norms, lm_head (unless tied)."""
    d = dims(arch)
    H, L, V = d["H"], d["L"], d["V"]
    shapes = linear_shapes(arch)
    linear_w = sum(i * o for i, o in shapes.values())
    bias = 0
    if arch.get("qkv_bias"):
        bias += d["Hq"] + 2 * d["Hkv"]
    if arch.get("o_bias"):
        bias += H
    norms = arch.get("norms_per_layer", 2) * H
    embed = V * H
    lm_head = 0 if arch.get("tie_word_embeddings") else V * H
    layers_linear = L * linear_w
    other = L * (bias + norms) + H  # + the final norm
    total = embed + lm_head + layers_linear + other
    return dict(total=total, embedding=embed, lm_head=lm_head, linear=layers_linear, other=other)


def lora_params(arch: dict, target_modules, r: int, use_dora: bool = False) -> tuple[int, list[str]]:
    """LoRA parameter count and the targeted module names (as PEFT matches them by name suffix)."""
    shapes = linear_shapes(arch)
    if target_modules == "all-linear":
        targets = list(shapes)
    else:
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        targets = [n for n in shapes if n in wanted]
    n = sum(r * (shapes[t][0] + shapes[t][1]) + (shapes[t][1] if use_dora else 0) for t in targets)
    return n * dims(arch)["L"], targets
