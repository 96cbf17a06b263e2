"""Pre-flight estimate for a RunConfig: peak GPU memory by component (core.memory, on the config
as core.resolve fills it for a CUDA card before any data is known), the memory plan the training
child would pick on a named card and the one verdict that follows (fits with the plan or not,
what each planned setting costs in speed), concrete changes when even the plan does not fit, and
time per epoch from measured throughput. No torch at import, no weights read. The layout people
read lives in the web app (webui.estimate_view) and the CLI (cli.estimate_text); the words for
each planned setting are data made here, so both say the same."""

from __future__ import annotations

import json
import subprocess

from . import resolve
from .arch import EstimateError, arch_for
from . import memory
from .memory import GIB, breakdown, round_gib, total_gib

__all__ = ["EstimateError", "arch_for", "estimate", "suggestions", "start_warnings", "detect_gpu", "parse_gpu_mem"]

# Measured training throughput, tokens/s, per (params class, method, card), with memory to spare.
# Only figures in docs/BENCHMARKS.md are listed; anything else is "unmeasured". The 0.5B QLoRA
# figure was measured at tiny sequence lengths (mean 36 tokens), so it understates longer samples;
# the rest are the default path on real chat lengths (mean 194 tokens, 8 samples a step), r=64 on
# 7 projections. "source" is read by people: what was measured, not where it is written down.
_CHAT = "chat rows of ~194 tokens, 8 a step, r=64 on 7 projections"
THROUGHPUT: dict[tuple[str, str, str], dict] = {
    ("0.5B", "qlora", "H200"): {"tokens_per_s": 366, "source": "a QLoRA smoke run on short samples (~36 tokens)"},
    ("0.5B", "lora", "H200"): {"tokens_per_s": 10427, "source": "Qwen2.5-0.5B shape, " + _CHAT},
    ("1.5B", "lora", "H200"): {"tokens_per_s": 7641, "source": "Qwen2.5-1.5B shape, " + _CHAT + "; the slower of two runs"},
    ("7B", "qlora", "H200"): {"tokens_per_s": 5101, "source": "Llama-3.1-8B shape, " + _CHAT + "; the slowest of four runs"},
}


def start_warnings(cfg) -> list[str]:
    """What the page says at Start before anything runs (never blocks it): a CPU run whose memory
    need exceeds this machine's RAM. (How long a run takes is measured by the run itself: the
    training child warns when its ETA passes a day.)"""
    from . import machine

    if cfg.model.name_or_path.strip() == "builtin:tiny":
        return []
    out = []
    cpu = machine.device_for(cfg.training.device) == "cpu"
    try:
        c = cfg.model_copy(deep=True)
        if cpu:
            c.training.device = "cpu"
        est = estimate(c, detect=not cpu)
    except (EstimateError, ValueError, KeyError, TypeError):
        return []
    ram = machine.total_ram() / GIB
    if cpu and ram and est["total_gib"] > 0.9 * ram:
        out.append(f"this run needs about {est['total_gib']:.0f} GiB of memory and this machine has {ram:.0f} GiB "
                   "of RAM (a CPU run keeps everything in RAM): it will most likely fail; use a smaller model or a GPU")
    tps = est["time"].get("tokens_per_s")
    if tps and cfg.training.max_steps > 0:
        seconds = cfg.training.max_steps * cfg.training.grad_accum * est["tokens_per_step"] / tps
        if seconds > 24 * 3600:
            out.append(f"{cfg.training.max_steps:,} steps of up to {est['tokens_per_step']:,} tokens would take about "
                       f"{seconds / 86400:.1f} days at the {tps:,.0f} tokens/s measured for this model on "
                       f"{est['time']['card']}")
    return out


# ---------------------------------------------------------------- GPU detection

def detect_gpu() -> tuple[float | None, str | None]:
    """(total GiB, name) of GPU 0: torch.cuda if torch is already loaded, else nvidia-smi; (None, None)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                p = torch.cuda.get_device_properties(0)
                return p.total_memory / GIB, p.name
        except Exception:  # noqa: BLE001 - no usable GPU
            pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total,name", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None, None
    if out.returncode != 0 or not out.stdout.strip():
        return None, None
    mib, name = out.stdout.strip().splitlines()[0].split(",", 1)
    return float(mib) / 1024, name.strip()


def parse_gpu_mem(text: str | float | int | None) -> float | None:
    """'24GB', '24GiB', '24', '80g', 24 -> GiB (a card's '24 GB' is what nvidia-smi calls ~24 GiB)."""
    if text is None or text == "":
        return None
    s = str(text).strip().lower().replace(" ", "")
    for suffix in ("gib", "gb", "g"):
        if s.endswith(suffix):
            s = s[: -len(suffix)]
            break
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"--gpu-mem: expected a size like 24GB, got {text!r}") from None
    if not 0 < value < 100_000:  # nan and inf fail this too
        raise ValueError(f"--gpu-mem: a size in GiB between 0 and 100,000 (got {text!r})")
    return value


def _params_class(n: int) -> str:
    for label, limit in (("tiny", 0.1e9), ("0.5B", 0.8e9), ("1.5B", 2.5e9), ("3B", 4.5e9), ("7B", 9.5e9), ("14B", 2e10)):
        if n < limit:
            return label
    return "large"


def _card_class(name: str | None) -> str | None:
    if not name:
        return None
    for card in ("H200", "H100", "A100", "L40S", "A10", "4090", "3090", "T4"):
        if card.lower() in name.lower():
            return card
    return None


def _planned(stage2, arch: dict, tokens: int, gpu_mem_gib: float):
    """The config the training child's memory plan would run on this card (worst case: every
    micro-batch full), with its settings and reasons: (config, settings, reasons)."""
    decided, why = resolve.plan(stage2, arch, tokens, gpu_mem_gib)
    return resolve.fill(memory.at_tokens(stage2, tokens), decided), decided, why


def _plannable(cfg, gpu_mem_gib) -> bool:
    """Whether the training child plans memory for this run on a named card (one CUDA GPU)."""
    return gpu_mem_gib is not None and cfg.training.device != "cpu" and cfg.training.gpus == 1


def peak_gib(cfg, arch: dict, gpu_mem_gib: float | None) -> float:
    """The peak the verdict is about: with the memory plan on a named one-GPU card, else the
    static figure (for_estimate)."""
    if not _plannable(cfg, gpu_mem_gib):
        return total_gib(resolve.for_estimate(cfg), arch)
    stage2 = resolve.resolve(cfg, resolve.assumed(cfg.training.device))
    tokens = stage2.template.cutoff_len * stage2.training.micro_batch_size
    return total_gib(_planned(stage2, arch, tokens, gpu_mem_gib)[0], arch)


def plan_changes(planned, decided: dict, arch: dict) -> list[dict]:
    """What the plan's settings do and what each costs in speed, as people read them:
    [{setting, text, cost, slower}], the settings that change something (off values are omitted)."""
    L = memory.dims(arch)["L"]
    t = planned.training
    out = []
    if "training.gradient_checkpointing" in decided:
        k = memory.checkpointed_layers(planned, L)
        if k:
            by_batch = " (each micro-batch only as many as its length needs)" if t.checkpoint_per_batch is True else ""
            out.append(dict(setting="training.gradient_checkpointing",
                            text=f"gradient checkpointing on {'every layer' if k == L else f'{k} of {L} layers'}{by_batch}",
                            cost=f"up to ~{k / L / 3:.0%} more compute a step (each of those layers runs its forward twice)",
                            slower=True))
        else:
            out.append(dict(setting="training.gradient_checkpointing", text="no gradient checkpointing",
                            cost="no cost (no layer runs its forward twice)", slower=False))
    m = memory.breakdown(planned, arch)["resolved"]["mlp_recompute_layers"]
    if decided.get("training.mlp_recompute") and m:
        out.append(dict(setting="training.mlp_recompute", text=f"the MLPs of {m} layers recompute gate and up in backward",
                        cost=f"~{m / L * memory._mlp_cost(arch):.0%} more compute a step, on the GPU alone", slower=True))
    if "8bit" in decided.get("training.optimizer", ""):
        out.append(dict(setting="training.optimizer", text=f"8-bit AdamW ({decided['training.optimizer']})",
                        cost="each optimizer step takes a few ms longer (its state is a quarter the size)", slower=True))
    if decided.get("model.embeddings_on_cpu"):
        out.append(dict(setting="model.embeddings_on_cpu", text="the embedding table in CPU RAM",
                        cost="small: a lookup on the CPU and a few MB copied to the GPU each step", slower=True))
    if decided.get("training.offload_activations"):
        out.append(dict(setting="training.offload_activations",
                        text=f"checkpointed activations in CPU RAM (~{memory.offloaded_gib(planned, arch):.1f} GiB)",
                        cost="every checkpointed layer's input is copied to CPU RAM and back each step", slower=True))
    if decided.get("training.tiled_mlp"):
        out.append(dict(setting="training.tiled_mlp", text="MLPs computed in tiles (long rows)",
                        cost="each tile is recomputed in backward", slower=True))
    if decided.get("training.cudnn_attention"):
        out.append(dict(setting="training.cudnn_attention", text="cuDNN attention (long rows)",
                        cost="none: faster on rows this long", slower=False))
    return out


def estimate(cfg, arch: dict | None = None, gpu_mem_gib: float | None = None, *, detect: bool = True,
             dataset_tokens: int | None = None) -> dict:
    """Peak GPU memory (GiB, by component), the verdict on a card, suggestions, time per epoch.

    gpu_mem_gib: the card to compare with; None: the detected GPU (unless detect=False).
    components/total_gib: the static settings (checkpointing on, fused AdamW, all on the GPU),
    the figure without a card. On a named one-GPU CUDA card, "plan" holds what the training
    child's memory plan would run there (settings, what each costs, its own components and peak),
    and fits is the plan's: one verdict, whichever figure is printed beside it."""
    if arch is None:
        arch = arch_for(cfg.model.name_or_path)
    if cfg.stage != "sft":  # a preference stage: as many sequences as it holds (core.stage.for_estimate)
        from . import stage as stage_lib

        cfg = stage_lib.for_estimate(cfg)
    machine_stage = resolve.resolve(cfg, resolve.assumed(cfg.training.device))  # the plan starts here
    resolved = resolve.fill(machine_stage.model_copy(deep=True), resolve.unplanned(machine_stage))
    br = breakdown(resolved, arch)
    comp_gib = {k: v / GIB for k, v in br["components"].items()}
    if cfg.stage in ("dpo", "kto") and cfg.method == "full":  # full fine-tuning keeps a frozen reference copy
        comp_gib["reference_model"] = comp_gib["weights"]
    total = sum(comp_gib.values())
    gpu_name = None
    if gpu_mem_gib is None and detect:
        gpu_mem_gib, gpu_name = detect_gpu()
    fits = None if gpu_mem_gib is None else total <= gpu_mem_gib
    out = dict(model=cfg.model.name_or_path, method=cfg.method, bits=cfg.quantization.bits,
               components=comp_gib, total_gib=total, total_rounded=round_gib(total),
               gpu_mem_gib=gpu_mem_gib, gpu_name=gpu_name, fits=fits, static_fits=fits,
               params_total=br["params_total"], params_trainable=br["params_trainable"],
               lora_targets=br["lora_targets"], tokens_per_step=br["tokens_per_step"], resolved=br["resolved"],
               suggestions=[])
    if _plannable(cfg, gpu_mem_gib):
        # what the training child's memory plan would pick on this card (worst case: full rows)
        planned, decided, why = _planned(machine_stage, arch, br["tokens_per_step"], gpu_mem_gib)
        pbr = breakdown(planned, arch)
        pcomp = {k: v / GIB for k, v in pbr["components"].items()}
        ptotal = sum(pcomp.values())
        out["plan"] = {"settings": decided, "reasons": why, "changes": plan_changes(planned, decided, arch),
                       "components": pcomp, "total_gib": ptotal, "total_rounded": round_gib(ptotal),
                       "resolved": pbr["resolved"], "fits": ptotal <= gpu_mem_gib}
        out["fits"] = fits = out["plan"]["fits"]
    if fits is False:
        out["suggestions"] = suggestions(cfg, arch, gpu_mem_gib)
    out["time"] = time_estimate(cfg, br["params_total"], gpu_name, dataset_tokens)
    return out


def _with(cfg, **overrides):
    """A copy of cfg with dotted overrides (validated like --set)."""
    from .config import apply_override, from_dict

    data = cfg.model_dump(mode="json")
    for k, v in overrides.items():
        apply_override(data, f"{k.replace('__', '.')}={json.dumps(v)}")
    if data.get("method") != "qlora":
        data["quantization"]["bits"] = None
    return from_dict(data)


def suggestions(cfg, arch: dict, gpu_mem_gib: float) -> list[dict]:
    """Concrete changes, each with its `--set` overrides and new estimated peak (with the memory
    plan where the verdict uses it, peak_gib); best first."""
    out: list[dict] = []
    t = cfg.training

    def add(text, **ov):
        try:
            new = _with(cfg, **ov)
        except Exception:  # noqa: BLE001 - an override that doesn't validate is not a suggestion
            return
        total = peak_gib(new, arch, gpu_mem_gib)
        sets = [f"{k.replace('__', '.')}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in ov.items()]
        out.append(dict(text=text, set=sets, total_gib=total, fits=total <= gpu_mem_gib))

    if resolve.for_estimate(cfg).training.gradient_checkpointing is False:
        add("turn gradient checkpointing on (recomputes activations: ~30% slower, far less memory)",
            training__gradient_checkpointing=True)
    if t.micro_batch_size > 1:
        acc = t.grad_accum * t.micro_batch_size
        add(f"micro-batch 1 with accumulation {acc} (same effective batch of {acc})",
            training__micro_batch_size=1, training__grad_accum=acc)
    cut = cfg.template.cutoff_len
    while cut > 256:
        cut //= 2
        if peak_gib(_with(cfg, template__cutoff_len=cut), arch, gpu_mem_gib) <= gpu_mem_gib or cut <= 256:
            add(f"lower cutoff_len to {cut} (longer samples are truncated; check the preview's truncated count)",
                template__cutoff_len=cut)
            break
    if cfg.method == "full":
        add("LoRA instead of full fine-tuning", method="lora")
    if cfg.method in ("lora", "full"):
        add("QLoRA: a 4-bit base (NF4, double quant)", method="qlora")
    if not cfg.template.packing and cfg.template.cutoff_len > 512:
        add("short samples? packing at half the cutoff_len keeps the GPU busy at a lower peak",
            template__packing=True, template__cutoff_len=cfg.template.cutoff_len // 2)
    if t.micro_batch_size > 1 and cfg.template.cutoff_len > 256:
        add("micro-batch 1, accumulation x micro-batch, and half the cutoff_len", training__micro_batch_size=1,
            training__grad_accum=t.grad_accum * t.micro_batch_size, template__cutoff_len=cfg.template.cutoff_len // 2)
    if not any(s["fits"] for s in out):  # no single change is enough: combine them
        combo = dict(training__micro_batch_size=1, training__grad_accum=t.grad_accum * t.micro_batch_size,
                     training__gradient_checkpointing=True)
        if cfg.method != "qlora":
            combo["method"] = "qlora"
        cut = cfg.template.cutoff_len
        while cut > 256 and peak_gib(_with(cfg, template__cutoff_len=cut, **combo), arch, gpu_mem_gib) > gpu_mem_gib:
            cut //= 2
        if cut != cfg.template.cutoff_len:
            combo["template__cutoff_len"] = cut
        add("combine: " + ", ".join(k.replace("__", ".") + f"={v}" for k, v in combo.items()), **combo)
    out.sort(key=lambda s: (not s["fits"], s["total_gib"] if not s["fits"] else 0))
    return out


def time_estimate(cfg, params_total: int, gpu_name: str | None, dataset_tokens: int | None) -> dict:
    card = _card_class(gpu_name)
    cls = _params_class(params_total)
    row = THROUGHPUT.get((cls, cfg.method, card)) if card else None
    if row is None:  # no card named or detected: any measured card for this class and method
        matches = [(k, v) for k, v in THROUGHPUT.items() if k[0] == cls and k[1] == cfg.method]
        if matches and card is None:
            (_c, _m, card), row = matches[0]
    if row is None:
        return dict(params_class=cls, method=cfg.method, card=card, tokens_per_s=None, status="unmeasured",
                    epoch_s=None)
    tps = row["tokens_per_s"]
    epoch = dataset_tokens / tps if dataset_tokens else None
    return dict(params_class=cls, method=cfg.method, card=card, tokens_per_s=tps, status="measured",
                source=row["source"], epoch_s=epoch, per_million_tokens_s=1e6 / tps)


def card_name(est: dict) -> str:
    """The card an estimate was made for, as people read it ("8 GiB", "24 GiB RTX 4090")."""
    return f"{est['gpu_mem_gib']:.0f} GiB" + (f" {est['gpu_name']}" if est.get("gpu_name") else "")


def verdict(est: dict, no_card: str, lead: str = "", sep: str = ", ") -> str:
    """The one verdict of an estimate (the CLI's and the web app's): on a named one-GPU card the
    memory plan's peak and whether it fits; no_card says how to name a card where none is known."""
    if est["fits"] is None:
        return f"estimated peak VRAM: {est['total_rounded']} GiB ({no_card})"
    plan, card = est.get("plan"), card_name(est)
    if plan is None:
        return (f"estimated peak VRAM: {est['total_rounded']} GiB: "
                + (f"fits the {card} card" if est["fits"] else f"does NOT fit the {card} card"))
    if est["fits"]:
        return f"{lead}fits the {card} card with the memory plan below{sep}estimated peak {plan['total_rounded']} GiB"
    return f"{lead}does NOT fit the {card} card, even with the memory plan below (estimated peak {plan['total_rounded']} GiB)"
