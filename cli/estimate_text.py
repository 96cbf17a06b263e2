"""The estimate in words for the terminal (`lorastudio estimate`, `train --gpu-mem`) and for preset
files (bench/gen_presets.py). On a named card the verdict is the memory plan's (core.estimate):
the static figure is printed only as context, labelled as what the plan improves on."""

from __future__ import annotations

from lorastudio.core import estimate
from lorastudio.core.memory import LABELS


def _fmt_time(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


def headline(est: dict) -> str:
    return estimate.verdict(est, "no GPU detected; name one with --gpu-mem", lead="verdict: ")


def _components(lines: list, comp: dict, total: float) -> None:
    for k, v in comp.items():
        lines.append(f"  {LABELS.get(k, k):<38} {v:7.2f} GiB")
    lines.append(f"  {'total':<38} {total:7.2f} GiB")


def time_line(est: dict) -> str:
    tm = est["time"]
    if tm["status"] != "measured":
        return f"time: unmeasured for {tm['params_class']} {tm['method']}" + (f" on {tm['card']}" if tm["card"] else "")
    t = f"time: {tm['tokens_per_s']:,} tokens/s measured on an {tm['card']} with memory to spare ({tm['source']})"
    t += f", ~{_fmt_time(tm['epoch_s'])} per epoch" if tm.get("epoch_s") else \
        f", ~{_fmt_time(tm['per_million_tokens_s'])} per million tokens"
    plan = est.get("plan")
    if plan and any(c["slower"] for c in plan["changes"]):
        t += "; slower with the memory plan's settings"
    return t


def format_text(est: dict) -> str:
    plan = est.get("plan")
    r = plan["resolved"] if plan else est["resolved"]
    lines = [f"model: {est['model']}  method: {est['method']}" + (f" ({est['bits']}-bit)" if est["bits"] else "")
             + f"  params: {est['params_total'] / 1e9:.2f}B total, {est['params_trainable'] / 1e6:.1f}M trained",
             f"{'with the memory plan' if plan else 'assumes'}: {r['device']}, {r['dtype']}, "
             f"gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}, "
             f"{r['optimizer']}, {est['tokens_per_step']} tokens per micro-batch"]
    if plan:
        _components(lines, plan["components"], plan["total_gib"])
    else:
        _components(lines, est["components"], est["total_gib"])
    lines.append(headline(est))
    if plan:
        lines.append("memory plan on this card (what training picks; every micro-batch at full length):")
        for c in plan["changes"]:
            lines.append(f"  - {c['text']}; speed: {c['cost']}")
        lines.append(f"  for comparison, every layer checkpointed with fused AdamW, all on the GPU: "
                     f"{est['total_rounded']} GiB")
    if est["suggestions"]:
        lines.append("to fit:")
    for s in est["suggestions"]:
        lines.append(f"  - {s['text']}: {s['total_gib']:.1f} GiB{' (fits)' if s['fits'] else ''}  "
                     + " ".join(f"--set {x}" for x in s["set"]))
    lines.append(time_line(est))
    return "\n".join(lines)


def preset_comment(est: dict) -> str:
    return f"# estimated peak VRAM: {est['total_rounded']} GiB (lorastudio estimate)"
