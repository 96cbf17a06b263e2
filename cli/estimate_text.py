"""The estimate in words for the terminal (`lorastudio estimate`, `train --gpu-mem`) and for preset
files (bench/gen_presets.py)."""

from __future__ import annotations

from lorastudio.core.memory import LABELS


def _fmt_time(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


def headline(est: dict) -> str:
    head = f"estimated peak VRAM: {est['total_rounded']} GiB"
    if est["fits"] is None:
        return head + " (no GPU detected; name one with --gpu-mem)"
    card = f"{est['gpu_mem_gib']:.0f} GiB" + (f" {est['gpu_name']}" if est.get("gpu_name") else "")
    return head + (f": fits the {card} card" if est["fits"] else f": does NOT fit the {card} card")


def format_text(est: dict) -> str:
    r = est["resolved"]
    lines = [f"model: {est['model']}  method: {est['method']}" + (f" ({est['bits']}-bit)" if est["bits"] else "")
             + f"  params: {est['params_total'] / 1e9:.2f}B total, {est['params_trainable'] / 1e6:.1f}M trained",
             f"assumes: {r['device']}, {r['dtype']}, gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}, "
             f"{r['optimizer']}, {est['tokens_per_step']} tokens per micro-batch"]
    for k, v in est["components"].items():
        lines.append(f"  {LABELS.get(k, k):<38} {v:7.2f} GiB")
    lines.append(f"  {'total':<38} {est['total_gib']:7.2f} GiB")
    lines.append(headline(est))
    for s in est["suggestions"]:
        lines.append(f"  - {s['text']}: {s['total_gib']:.1f} GiB{' (fits)' if s['fits'] else ''}  "
                     + " ".join(f"--set {x}" for x in s["set"]))
    if est.get("plan") and est["plan"]["settings"]:
        lines.append("memory plan on this card (auto settings, full rows): "
                     + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in est["plan"]["settings"].items())
                     + f"; {est['plan']['reasons'][-1]}")
    tm = est["time"]
    if tm["status"] == "measured":
        t = f"time: {tm['tokens_per_s']} tokens/s on {tm['card']} ({tm['source']})"
        t += f", ~{_fmt_time(tm['epoch_s'])} per epoch" if tm.get("epoch_s") else \
            f", ~{_fmt_time(tm['per_million_tokens_s'])} per million tokens"
    else:
        t = f"time: unmeasured for {tm['params_class']} {tm['method']}" + (f" on {tm['card']}" if tm["card"] else "")
    lines.append(t)
    return "\n".join(lines)


def preset_comment(est: dict) -> str:
    return f"# estimated peak VRAM: {est['total_rounded']} GiB (lorastudio estimate)"
