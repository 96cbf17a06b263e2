"""Model tab: pick the base model (builtin:tiny preselected, a local folder or a hub id) and see
what it is. Reads config.json, tokenizer_config.json and safetensors headers only: never weights,
never the model's own code."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gradio as gr

from .helpers import err_md

REMOTE_CODE_WARNING = ("⚠️ trust_remote_code runs Python shipped with the model on this machine, "
                       "in the training and chat processes. Tick it only for models whose authors you trust.")


def _safetensors_params(files: list[Path]) -> int | None:
    """Parameter count from safetensors headers (8-byte length + JSON): no tensor is read."""
    from lorastudio.core import safe_io

    total = 0
    for f in files[:1000]:
        safe_io.check_regular(f, "safetensors file")
        with open(f, "rb") as fh:
            head = fh.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            if not 0 < n <= 100 * 2**20:  # the format caps its header at 100 MB
                raise ValueError(f"{f.name}: not a safetensors file (header of {n:,} bytes)")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in meta["shape"]:
                count *= int(d)
            total += count
    return total


def _folder(name_or_path: str) -> Path:
    """A local folder for NAME: builtin:tiny, a folder, or a hub id already in the local HF cache."""
    from lorastudio.core import tiny

    if name_or_path.strip() == tiny.TINY_MODEL:
        return Path(tiny.resolve_model(name_or_path))
    from .helpers import readable

    name_or_path = readable(name_or_path)
    p = Path(name_or_path).expanduser()
    if p.exists() or name_or_path.startswith((".", "/", "~")):
        if not p.is_dir():
            raise ValueError(f"folder not found: {name_or_path}")
        return p
    if name_or_path.count("/") != 1:
        raise ValueError(f"{name_or_path!r} is neither a folder nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download  # config and tokenizer files only

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.jinja", "*.model", "*.txt"]))
    except Exception as e:  # noqa: BLE001 - offline or unknown repo
        raise ValueError(f"cannot fetch {name_or_path} config (offline or unknown repo): {type(e).__name__}") from None


def model_info(name_or_path: str, trust_remote_code: bool = False) -> dict:
    """What the model is, from its files: architecture, parameters, dtype, vocab, chat template."""
    name_or_path = (name_or_path or "").strip() or "builtin:tiny"
    folder = _folder(name_or_path)
    from lorastudio.core import safe_io

    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ValueError(f"{name_or_path}: no config.json (is it a model folder?)")
    cfg = safe_io.read_json(cfg_path)
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = safe_io.read_json(tok_cfg_path) if tok_cfg_path.exists() else {}
    if not isinstance(cfg, dict) or not isinstance(tok_cfg, dict):
        raise ValueError(f"{name_or_path}: config.json and tokenizer_config.json must be JSON objects")
    has_template = bool(tok_cfg.get("chat_template")) or (folder / "chat_template.jinja").exists() \
        or (folder / "chat_template.json").exists()
    files = sorted(folder.glob("*.safetensors"))
    params = _safetensors_params(files) if files else None
    if params is None and (folder / "model.safetensors.index.json").exists():
        index = safe_io.read_json(folder / "model.safetensors.index.json")
        size = ((index.get("metadata") or {}) if isinstance(index, dict) else {}).get("total_size")
        size = size if isinstance(size, (int, float)) else None
        dtype_b = {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.get("torch_dtype") or cfg.get("dtype"), 2)
        params = int(size / dtype_b) if size else None
    needs_code = "auto_map" in cfg
    warnings = []
    if needs_code and not trust_remote_code:
        warnings.append("This model ships its own code (auto_map in config.json): training and chat refuse "
                        "it unless trust_remote_code is ticked.")
    if trust_remote_code:
        warnings.append(REMOTE_CODE_WARNING)
    if not has_template:
        warnings.append("No chat template: pick a named template in the Template tab (or train on plain text).")
    return {
        "name_or_path": name_or_path,
        "folder": str(folder),
        "architecture": ", ".join(cfg.get("architectures") or [cfg.get("model_type", "?")]),
        "model_type": cfg.get("model_type"),
        "parameters": params,
        "dtype": cfg.get("torch_dtype") or cfg.get("dtype") or "float32 (not declared)",
        "vocab_size": cfg.get("vocab_size"),
        "hidden_size": cfg.get("hidden_size"),
        "layers": cfg.get("num_hidden_layers"),
        "context": cfg.get("max_position_embeddings"),
        "has_chat_template": has_template,
        "needs_remote_code": needs_code,
        "warnings": warnings,
    }


def _fmt_params(n: int | None) -> str:
    if not n:
        return "unknown"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit} ({n:,})"
    return str(n)


def model_info_view(name_or_path: str, trust_remote_code: bool):
    """(info dict, markdown) for the UI; an error is a message and an empty dict."""
    try:
        info = model_info(name_or_path, bool(trust_remote_code))
    except Exception as e:  # noqa: BLE001
        return {}, err_md(e)
    rows = [("Architecture", info["architecture"]), ("Parameters", _fmt_params(info["parameters"])),
            ("Dtype", info["dtype"]), ("Vocabulary", info["vocab_size"]), ("Hidden size", info["hidden_size"]),
            ("Layers", info["layers"]), ("Context", info["context"]),
            ("Chat template", "yes" if info["has_chat_template"] else "no")]
    md = f"| {info['name_or_path']} | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if info["warnings"]:
        md += "\n\n" + "\n\n".join(f"⚠️ {w}" if not w.startswith("⚠️") else w for w in info["warnings"])
    return info, md


def model_estimate_view(name_or_path: str) -> str:
    """Markdown: estimated peak VRAM of QLoRA/LoRA/full for this model (pure arithmetic, no torch)."""
    from .estimate_view import model_markdown

    return model_markdown(name_or_path)


def build(ui: dict) -> None:
    gr.Markdown("The base model to fine-tune. `builtin:tiny` is an embedded tiny chat model that works offline.")
    with gr.Row():
        ui["model"] = gr.Textbox(value="builtin:tiny", label="Model (builtin:tiny, a local folder, or a hub id)",
                                 scale=3)
        ui["trust_remote_code"] = gr.Checkbox(value=False, label="trust_remote_code", scale=1)
    ui["model_inspect"] = gr.Button("Inspect", variant="primary")
    ui["model_md"] = gr.Markdown()
    ui["model_estimate_md"] = gr.Markdown()
    ui["model_json"] = gr.JSON(visible=False)


def wire(ui: dict, demo) -> None:
    args = ([ui["model"], ui["trust_remote_code"]], [ui["model_json"], ui["model_md"]])
    ui["model_inspect"].click(model_info_view, *args, api_name="model_info").then(
        model_estimate_view, [ui["model"]], [ui["model_estimate_md"]], api_visibility="private")
    ui["model"].submit(model_info_view, *args, api_visibility="private")
    ui["trust_remote_code"].change(model_info_view, *args, api_visibility="private")
    demo.load(model_info_view, *args, api_visibility="private").then(
        model_estimate_view, [ui["model"]], [ui["model_estimate_md"]], api_visibility="private")
