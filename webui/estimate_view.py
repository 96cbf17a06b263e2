"""The estimate as the web app shows it: markdown for the Model and Train tabs, never raising."""

from __future__ import annotations

from lorastudio.core import estimate
from lorastudio.core.config import ConfigError, RunConfig, from_dict
from lorastudio.core.memory import LABELS

TINY_NOTE = "VRAM estimate: the embedded tiny model (builtin:tiny) needs well under 1 GiB; it trains on CPU too."


def headline(est: dict) -> str:
    head = f"estimated peak VRAM: {est['total_rounded']} GiB"
    if est["fits"] is None:
        return head + " (no GPU detected; name a card to compare)"
    card = f"{est['gpu_mem_gib']:.0f} GiB" + (f" {est['gpu_name']}" if est.get("gpu_name") else "")
    return head + (f": fits the {card} card" if est["fits"] else f": does NOT fit the {card} card")


def format_markdown(est: dict) -> str:
    rows = "\n".join(f"| {LABELS.get(k, k)} | {v:.2f} GiB |" for k, v in est["components"].items())
    md = f"**{headline(est)}**\n\n| component | GiB |\n|---|---|\n{rows}\n| **total** | **{est['total_gib']:.2f} GiB** |"
    if est["suggestions"]:
        md += "\n\nTo fit:\n" + "\n".join(f"- {s['text']}: {s['total_gib']:.1f} GiB" + (" ✓" if s["fits"] else "")
                                           for s in est["suggestions"])
    if est.get("plan") and est["plan"]["settings"]:
        md += "\n\nMemory plan on this card (the auto settings; full-length rows): " + ", ".join(
            f"`{k.split('.')[-1]}: {v}`" for k, v in est["plan"]["settings"].items()) + f" — {est['plan']['reasons'][-1]}"
    tm = est["time"]
    md += "\n\n" + (f"Throughput: {tm['tokens_per_s']} tokens/s on {tm['card']} (measured)" if tm["status"] == "measured"
                    else f"Time per epoch: unmeasured for {tm['params_class']} {tm['method']}")
    return md


def estimate_markdown(cfg_or_dict, gpu_mem: str | float | None = None) -> str:
    """UI helper: markdown for a RunConfig (or its dict); errors become one line, never raise."""
    try:
        cfg = cfg_or_dict if isinstance(cfg_or_dict, RunConfig) else from_dict(cfg_or_dict)
        if cfg.model.name_or_path.strip() == "builtin:tiny":
            return TINY_NOTE
        return format_markdown(estimate.estimate(cfg, gpu_mem_gib=estimate.parse_gpu_mem(gpu_mem)))
    except (ConfigError, estimate.EstimateError, ValueError, KeyError) as e:
        return f"VRAM estimate unavailable: {e}"


def model_markdown(name_or_path: str, gpu_mem: str | float | None = None) -> str:
    """UI helper for the Model tab: peak VRAM of LoRA, QLoRA and full fine-tuning of this model at
    the default knobs (cutoff 1024, micro-batch 4); never raises."""
    name = (name_or_path or "").strip() or "builtin:tiny"
    if name == "builtin:tiny":
        return TINY_NOTE
    try:
        arch = estimate.arch_for(name)
        gpu = estimate.parse_gpu_mem(gpu_mem)
        rows = []
        for method in ("qlora", "lora", "full"):
            cfg = RunConfig.model_validate({"model": {"name_or_path": name}, "method": method})
            est = estimate.estimate(cfg, arch, gpu_mem_gib=gpu, detect=gpu is None)
            fit = "" if est["fits"] is None else (" ✓ fits" if est["fits"] else " ✗ does not fit")
            rows.append(f"| {method} | {est['total_rounded']} GiB{fit} |")
        card = est["gpu_mem_gib"]
        head = f"**Estimated peak VRAM** (cutoff 1024, micro-batch 4{f', vs {card:.0f} GiB' if card else ''})"
        return head + "\n\n| method | peak |\n|---|---|\n" + "\n".join(rows)
    except (estimate.EstimateError, ValueError, KeyError) as e:
        return f"VRAM estimate unavailable: {e}"
