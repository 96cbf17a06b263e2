"""The estimate as the web app shows it: markdown for the Model and Train tabs, never raising."""

from __future__ import annotations

from lorastudio.core import estimate, tiny
from lorastudio.core.config import ConfigError, RunConfig, from_dict
from lorastudio.core.memory import LABELS

TINY_NOTE = "VRAM estimate: the embedded tiny model (builtin:tiny) needs well under 1 GiB; it trains on CPU too."


def headline(est: dict) -> str:
    return estimate.verdict(est, "no GPU detected; name a card to compare", sep=": ")


def format_markdown(est: dict) -> str:
    plan = est.get("plan")
    comp, total = (plan["components"], plan["total_gib"]) if plan else (est["components"], est["total_gib"])
    rows = "\n".join(f"| {LABELS.get(k, k)} | {v:.2f} GiB |" for k, v in comp.items())
    md = f"**{headline(est)}**"
    if plan:
        md += ("\n\nMemory plan on this card (what training picks; every micro-batch at full length):\n"
               + "\n".join(f"- {c['text']} — speed: {c['cost']}" for c in plan["changes"])
               + f"\n\nFor comparison, every layer checkpointed with fused AdamW, all on the GPU: "
                 f"{est['total_rounded']} GiB.")
    md += f"\n\n| component | GiB |\n|---|---|\n{rows}\n| **total** | **{total:.2f} GiB** |"
    if est["suggestions"]:
        md += "\n\nTo fit:\n" + "\n".join(f"- {s['text']}: {s['total_gib']:.1f} GiB" + (" ✓" if s["fits"] else "")
                                           for s in est["suggestions"])
    tm = est["time"]
    if tm["status"] == "measured":
        md += (f"\n\nThroughput: {tm['tokens_per_s']:,} tokens/s measured on an {tm['card']} with memory to spare"
               + ("; slower with the memory plan's settings" if plan and any(c["slower"] for c in plan["changes"])
                  else ""))
    else:
        md += f"\n\nTime per epoch: unmeasured for {tm['params_class']} {tm['method']}"
    return md


def estimate_markdown(cfg_or_dict, gpu_mem: str | float | None = None) -> str:
    """UI helper: markdown for a RunConfig (or its dict); errors become one line, never raise."""
    try:
        cfg = cfg_or_dict if isinstance(cfg_or_dict, RunConfig) else from_dict(cfg_or_dict)
        if tiny.is_tiny_model(cfg.model.name_or_path):  # (builtin:tiny@4 as a run's config.yaml pins it too)
            return TINY_NOTE
        return format_markdown(estimate.estimate(cfg, gpu_mem_gib=estimate.parse_gpu_mem(gpu_mem)))
    except (ConfigError, estimate.EstimateError, ValueError, KeyError) as e:
        return f"VRAM estimate unavailable: {e}"


def model_markdown(name_or_path: str, gpu_mem: str | float | None = None) -> str:
    """UI helper for the Model tab: peak VRAM of LoRA, QLoRA and full fine-tuning of this model at
    the default knobs (cutoff 1024, micro-batch 4), on a card with its memory plan (the Train
    tab's verdict); never raises."""
    name = (name_or_path or "").strip() or "builtin:tiny"
    if tiny.is_tiny_model(name):
        return TINY_NOTE
    try:
        arch = estimate.arch_for(name)
        gpu = estimate.parse_gpu_mem(gpu_mem)
        rows = []
        for method in ("qlora", "lora", "full"):
            cfg = RunConfig.model_validate({"model": {"name_or_path": name}, "method": method})
            est = estimate.estimate(cfg, arch, gpu_mem_gib=gpu, detect=gpu is None)
            fit = "" if est["fits"] is None else (" ✓ fits" if est["fits"] else " ✗ does not fit")
            peak = est["plan"]["total_rounded"] if est.get("plan") else est["total_rounded"]  # the verdict's figure
            rows.append(f"| {method} | {peak} GiB{fit} |")
        card = est["gpu_mem_gib"]
        vs = f", on {card:.0f} GiB with the memory plan training picks there" if card else ""
        head = f"**Estimated peak VRAM** (cutoff 1024, micro-batch 4{vs})"
        return head + "\n\n| method | peak |\n|---|---|\n" + "\n".join(rows)
    except (estimate.EstimateError, ValueError, KeyError) as e:
        return f"VRAM estimate unavailable: {e}"
