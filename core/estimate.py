"""Pre-flight estimate of peak GPU memory and time per epoch for a RunConfig.

Pure arithmetic on the architecture (core.model_configs, or a local folder's config.json): no
torch at import, no weights read. It models what *this product's* training path allocates
(core.model.load_for_training + core.train.build_trainer on CUDA, bf16):

Weights (`weights`)
  16-bit (lora/full, bf16/fp16): 2 bytes/param; fp32: 4.
  QLoRA 4-bit NF4/FP4: the decoder's linear layers at 0.5 byte/param + quantisation constants
  (blocksize 64: one fp32 absmax per block = 4/64 byte/param; with double quant the absmax is
  8-bit plus one fp32 per 256 blocks: 1/64 + 4/(64*256) byte/param). 8-bit: 1 byte/param + one
  fp32 scale per output row. Embeddings, lm_head and norms are not quantised and stay in the
  compute dtype; with quantization.fp32_upcast (stock PEFT's prepare_model_for_kbit_training)
  they cost 4 bytes/param.
LoRA (`lora`)
  r * (in + out) per targeted linear (+ out for DoRA's magnitude), kept in fp32 by PEFT
  (autocast_adapter_dtype): 4 bytes weights + 4 grads + 8 AdamW state = 16 bytes/param.
Full fine-tuning (`gradients`, `optimizer`)
  grads in the weights' dtype; torch AdamW keeps exp_avg/exp_avg_sq in the parameter dtype
  (2 x weights); the foreach step adds one parameter-sized temporary (`optimizer_step_temp`).
Activations (`activations`), per token, per decoder layer, compute dtype b bytes (2 for bf16):
  without gradient checkpointing everything autograd saves:
    norms     2 x 4H            (RMSNorm saves its fp32 input copy)           [+4H more for Gemma-2]
    norm outs 2 x bH            (the input of the attention and MLP linears)
    attention b(2Hq + 2Hkv)     (rotated q, k, v and the SDPA output; flash/mem-efficient SDPA,
                                 no s^2 term. eager attention adds 16 bytes x heads x s per token:
                                 scores, softcapping, softmax in fp32, probabilities)
    MLP       4 bI              (gate, act(gate), up, act*up)
    LoRA      nothing more with dropout 0 (lora_A saves the same input tensor as the base layer:
              bitsandbytes layers skip PEFT's input cast under autocast, and the product turns it
              off for 16-bit layers); with dropout > 0, b x in (the dropped copy) + 1 x in (the mask)
              per targeted linear
    full FT   + 2bH             (the norm-weight products that need their input)
  with gradient checkpointing: only each layer's input, rH per token (r = 4 under QLoRA with
  fp32_upcast, where fp32 embeddings and norms make the residual stream fp32; else b), plus one layer recomputed
  during backward (the full per-layer figure above, once) and the gradient of the hidden state.
  Tokens = cutoff_len x micro_batch_size (the worst case: rows padded to the batch's longest).
Logits (`logits`)
  N x V x LOGITS_BYTES: the 16-bit logits, their fp32 upcast in the loss, log-softmax saved for
  backward and its gradient (~12 bytes/logit at the peak; Gemma-2's final softcapping adds 4).
  With fp32_upcast the fp32 lm_head is cast to a 16-bit copy that autograd keeps (2VH).
  With training.kernels (liger's fused linear + cross-entropy) the logits are built a chunk of
  N / ceil(V / H) tokens at a time, 6 bytes/logit (16-bit logits + fp32 gradient), plus the fp32
  gradient of the hidden states (4NH).
Fixed
  CUDA context (`CUDA_CONTEXT_GIB`: the driver, cuBLAS and kernels; counted by nvidia-smi, not by
  torch) and the allocator margin (`FRAGMENTATION` of the dynamic memory + `STATIC_SLACK` of the
  static: reserved-but-unallocated blocks of torch's caching allocator).

The total is compared with the detected GPU (torch.cuda if torch is already loaded, else
nvidia-smi) or a card the caller names (gpu_mem_gib). When it does not fit, suggestions are
concrete config changes with their new estimated total.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

GIB = 1024 ** 3
CUDA_CONTEXT_GIB = 0.6  # CUDA context + cuBLAS workspace + loaded kernels on an H100/H200 (torch 2.x, CUDA 12/13)
FRAGMENTATION = 0.10  # extra reserved over allocated for the dynamic part (activations, logits)
STATIC_SLACK = 0.02  # and for the static part (weights, grads, optimizer state)
LOGITS_BYTES = 12  # bytes per logit at the loss peak: bf16 logits (2) + fp32 upcast (4) + log-softmax (4) + ...
SOFTCAP_LOGITS_BYTES = 4  # Gemma-2 final_logit_softcapping: the scaled and tanh'd copies
EAGER_SCORE_BYTES = 16  # eager attention, per head x s x s: scores, softcap, fp32 softmax, probabilities
NF4_BLOCK = 64

# Measured training throughput, tokens/s, per (params class, method, card). Only figures in
# docs/BENCHMARKS.md are listed; anything else is "unmeasured". The 0.5B QLoRA figure was measured
# at tiny sequence lengths (mean 36 tokens), so it understates longer samples; the rest are the
# default path on real chat lengths (mean 194 tokens, 8 samples a step), r=64 on 7 projections.
_CHAT = "docs/BENCHMARKS.md, Training speed: real chat lengths, 8 samples/step, r=64 on 7 projections"
THROUGHPUT: dict[tuple[str, str, str], dict] = {
    ("0.5B", "qlora", "H200"): {"tokens_per_s": 366, "source": "docs/BENCHMARKS.md, QLoRA on CUDA (smoke, short samples)"},
    ("0.5B", "lora", "H200"): {"tokens_per_s": 10427, "source": _CHAT + ", Qwen2.5-0.5B shape"},
    ("1.5B", "lora", "H200"): {"tokens_per_s": 7641, "source": _CHAT + ", Qwen2.5-1.5B shape (the slower of two runs)"},
    ("7B", "qlora", "H200"): {"tokens_per_s": 5101, "source": _CHAT + ", Llama-3.1-8B shape (the slowest of four runs)"},
}


class EstimateError(ValueError):
    """The architecture of the model is unknown (not stored, no local config.json)."""


# ---------------------------------------------------------------- architecture and parameters

def arch_for(name_or_path: str) -> dict:
    """The architecture dict for a hub id (stored), a local folder (its config.json) or builtin:tiny."""
    from . import model_configs

    arch = model_configs.lookup(name_or_path)
    if arch is not None:
        return arch
    path = Path(name_or_path).expanduser()
    if name_or_path.strip() == "builtin:tiny":
        from . import tiny

        path = Path(tiny.resolve_model(name_or_path))
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        from . import safe_io

        try:
            data = safe_io.read_json(cfg_file)
            arch = model_configs.from_config_json(data)
            _dims(arch)  # every size it needs, as an int
            if not all(isinstance(v, int) and 0 < v < 10**7 for k, v in arch.items() if k in _SIZES):
                raise TypeError("sizes")
            return arch
        except (safe_io.FileProblem, AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError):
            raise EstimateError(f"{cfg_file}: not a usable model config (sizes missing or not numbers)") from None
    raise EstimateError(f"no stored architecture for {name_or_path!r} and no config.json there; "
                        "pass a local model folder or one of the preset models")


_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
          "num_key_value_heads", "head_dim")


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


def _dims(arch: dict) -> dict:
    H = arch["hidden_size"]
    nh = arch["num_attention_heads"]
    nkv = arch.get("num_key_value_heads") or nh
    hd = arch.get("head_dim") or H // nh
    return dict(H=H, I=arch["intermediate_size"], L=arch["num_hidden_layers"], V=arch["vocab_size"],
                nh=nh, nkv=nkv, hd=hd, Hq=nh * hd, Hkv=nkv * hd)


def linear_shapes(arch: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one decoder layer, by its module name."""
    from . import model_configs

    d = _dims(arch)
    H, I, Hq, Hkv = d["H"], d["I"], d["Hq"], d["Hkv"]
    names = model_configs.linear_names(arch)
    if arch.get("model_type") == "phi3":
        return dict(zip(names, [(H, Hq + 2 * Hkv), (Hq, H), (H, 2 * I), (I, H)]))
    if arch.get("model_type") == "internlm2":
        return dict(zip(names, [(H, Hq + 2 * Hkv), (Hq, H), (H, I), (H, I), (I, H)]))
    return dict(zip(names, [(H, Hq), (H, Hkv), (H, Hkv), (Hq, H), (H, I), (H, I), (I, H)]))


def param_counts(arch: dict) -> dict:
    """Exact parameter counts: embedding, per-layer linears (+ biases), norms, lm_head (unless tied)."""
    d = _dims(arch)
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
    return n * _dims(arch)["L"], targets


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


# ---------------------------------------------------------------- the estimate

def _params_class(n: int) -> str:
    for label, limit in (("0.5B", 0.8e9), ("1.5B", 2.5e9), ("3B", 4.5e9), ("7B", 9.5e9), ("14B", 2e10)):
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


def _resolved(cfg) -> dict:
    """The values resolve() would pick on a CUDA machine (or the CPU when the config says so)."""
    t = cfg.training
    on_cpu = t.device == "cpu"
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
    gc = t.gradient_checkpointing if t.gradient_checkpointing != "auto" else (not on_cpu)
    sharded = t.gpus > 1 and t.strategy in ("fsdp", "zero3")
    opt = t.optimizer if t.optimizer != "auto" else ("adamw_torch_fused" if not on_cpu and not sharded
                                                     else "adamw_torch")
    kernels = t.kernels
    if kernels == "auto":
        from .config import liger_available

        kernels = "all" if not on_cpu and liger_available() else "off"
    emb_cpu = cfg.model.embeddings_on_cpu is True and cfg.method == "qlora" and not on_cpu
    return dict(device="cpu" if on_cpu else "cuda", dtype=dtype, gradient_checkpointing=bool(gc), optimizer=opt,
                kernels=kernels, embeddings_on_cpu=emb_cpu, offload_activations=t.offload_activations is True,
                tiled_mlp=t.tiled_mlp is True)


def _breakdown(cfg, arch: dict) -> dict:
    r = _resolved(cfg)
    d = _dims(arch)
    H, I, L, V, Hq, Hkv = d["H"], d["I"], d["L"], d["V"], d["Hq"], d["Hkv"]
    b = 4 if r["dtype"] == "float32" else 2
    pc = param_counts(arch)
    method = cfg.method
    bits = cfg.quantization.bits if method == "qlora" else None
    opt_8bit = "8bit" in r["optimizer"]
    state_bytes = 2 if opt_8bit else (8 if "32bit" in r["optimizer"] or b == 4 else 2 * b)

    comp: dict[str, float] = {}
    # weights
    non_linear = pc["total"] - pc["linear"]
    upcast = 4 if (bits and cfg.quantization.fp32_upcast) else b  # bytes/param of what is not quantised
    if bits == 4:
        per = 0.5 + (1 / NF4_BLOCK + 4 / (NF4_BLOCK * 256) if cfg.quantization.double_quant else 4 / NF4_BLOCK)
        comp["weights"] = pc["linear"] * per + non_linear * upcast
    elif bits == 8:
        rows = sum(o for _i, o in linear_shapes(arch).values()) * L
        comp["weights"] = pc["linear"] * 1 + rows * 4 + non_linear * upcast
    else:
        comp["weights"] = pc["total"] * b
    if r["embeddings_on_cpu"] and not arch.get("tie_word_embeddings"):
        comp["weights"] -= pc["embedding"] * upcast  # the table lives in CPU RAM

    # trainable parameters: LoRA (fp32 weights + grads + AdamW) or the full model
    n_lora, targets = (0, [])
    if method in ("lora", "qlora"):
        n_lora, targets = lora_params(arch, cfg.lora.target_modules, cfg.lora.r, cfg.lora.use_dora)
        comp["lora"] = n_lora * (4 + 4 + (2 if opt_8bit else 8))
        trainable = n_lora
    else:
        comp["gradients"] = pc["total"] * b
        comp["optimizer"] = pc["total"] * state_bytes
        trainable = pc["total"]

    # activations, per token per layer (see the module docstring)
    tokens = cfg.template.cutoff_len * cfg.training.micro_batch_size
    resid = _resid_bytes(cfg, r["dtype"])
    norms = arch.get("norms_per_layer", 2)
    per_layer = norms * 4 * H + 2 * b * H + b * (2 * Hq + 2 * Hkv) + 4 * b * I
    tile = tiled_mlp_tile(H)
    if r["tiled_mlp"] and tokens > tile:  # the MLP's intermediates: one tile at a time
        per_layer -= 4 * b * I * (1 - tile / tokens)
    if method == "full":
        per_layer += 2 * b * H
    else:
        shapes = linear_shapes(arch)
        per_in = (b + 1) if cfg.lora.dropout > 0 else 0
        per_layer += sum(shapes[t][0] for t in targets) * per_in
    if cfg.model.attn_implementation == "eager":
        per_layer += EAGER_SCORE_BYTES * d["nh"] * cfg.template.cutoff_len
    offload = r["offload_activations"]  # saved tensors in CPU RAM: only the layer being recomputed stays
    if r["gradient_checkpointing"]:
        act = tokens * ((0 if offload else L * resid * H) + per_layer + 2 * b * H)
    else:
        act = tokens * (1 if offload else L) * per_layer
    comp["activations"] = act

    logit_bytes = LOGITS_BYTES + (SOFTCAP_LOGITS_BYTES if arch.get("final_logit_softcapping") else 0)
    if r["kernels"] in ("loss", "all"):
        chunk = tokens / max(1, -(-V // H))
        comp["logits"] = chunk * V * 6 + tokens * H * 4
    else:
        comp["logits"] = tokens * V * logit_bytes + (2 * V * H if bits and upcast == 4 else 0)
    if bits:  # one dequantised weight at a time (the widest linear), in and out of the matmul
        comp["dequant_buffer"] = 2 * max(i * o for i, o in linear_shapes(arch).values()) * 2
    if method == "full":
        # the foreach AdamW step needs one parameter-sized temporary; activations are gone by then
        temp = pc["total"] * b
        comp["optimizer_step_temp"] = max(0.0, temp - (comp["activations"] + comp["logits"]))

    static = sum(v for k, v in comp.items() if k in ("weights", "lora", "gradients", "optimizer"))
    dynamic = sum(v for k, v in comp.items() if k not in ("weights", "lora", "gradients", "optimizer"))
    comp["allocator_margin"] = FRAGMENTATION * dynamic + STATIC_SLACK * static
    if r["device"] == "cuda":
        comp["cuda_context"] = CUDA_CONTEXT_GIB * GIB
    return dict(components=comp, resolved=r, params_total=pc["total"], params_trainable=trainable,
                lora_targets=targets, tokens_per_step=tokens, params=pc)


def _total_gib(cfg, arch) -> float:
    return sum(_breakdown(cfg, arch)["components"].values()) / GIB


def round_gib(x: float) -> float:
    return round(x, 1)


def estimate(cfg, arch: dict | None = None, gpu_mem_gib: float | None = None, *, detect: bool = True,
             dataset_tokens: int | None = None) -> dict:
    """Peak GPU memory (GiB, by component), fits or not, suggestions, time per epoch.

    gpu_mem_gib: the card to compare with; None: the detected GPU (unless detect=False)."""
    if arch is None:
        arch = arch_for(cfg.model.name_or_path)
    br = _breakdown(cfg, arch)
    comp_gib = {k: v / GIB for k, v in br["components"].items()}
    total = sum(comp_gib.values())
    gpu_name = None
    if gpu_mem_gib is None and detect:
        gpu_mem_gib, gpu_name = detect_gpu()
    fits = None if gpu_mem_gib is None else total <= gpu_mem_gib
    out = dict(model=cfg.model.name_or_path, method=cfg.method, bits=cfg.quantization.bits,
               components=comp_gib, total_gib=total, total_rounded=round_gib(total),
               gpu_mem_gib=gpu_mem_gib, gpu_name=gpu_name, fits=fits,
               params_total=br["params_total"], params_trainable=br["params_trainable"],
               lora_targets=br["lora_targets"], tokens_per_step=br["tokens_per_step"], resolved=br["resolved"],
               suggestions=[])
    if gpu_mem_gib is not None and cfg.training.device != "cpu" and cfg.training.gpus == 1:
        # what the training child's memory plan would pick on this card (worst case: full rows)
        decided, why = memory_plan(cfg, arch, br["tokens_per_step"], gpu_mem_gib)
        out["plan"] = {"settings": decided, "reasons": why}
    if fits is False:
        out["suggestions"] = suggestions(cfg, arch, gpu_mem_gib)
    out["time"] = time_estimate(cfg, br["params_total"], gpu_name, dataset_tokens)
    return out


CHECKPOINTING_HEADROOM = 0.85  # turn checkpointing off only when the estimate uses <= 85% of free memory


def _at_tokens(cfg, max_tokens: int):
    """A copy of cfg whose estimate counts max_tokens per micro-batch (tokens = cutoff_len x mb)."""
    c = cfg.model_copy(deep=True)
    c.template.cutoff_len = max(1, -(-max_tokens // c.training.micro_batch_size))
    return c


def checkpointing_decision(cfg, arch: dict | None, max_tokens: int, free_gib: float) -> tuple[bool, str]:
    """gradient_checkpointing: auto on CUDA, decided once the data is known: off (no recompute,
    ~1.3-7x faster steps) when the largest micro-batch of this dataset (max_tokens) fits in the
    card's free memory without it, by this estimate with headroom; on otherwise or when the
    architecture is unknown. Returns (checkpointing, reason)."""
    if arch is None:
        return True, "unknown architecture: kept on"
    c = _at_tokens(cfg, max_tokens)
    c.training.gradient_checkpointing = False
    need = _total_gib(c, arch)
    if need <= CHECKPOINTING_HEADROOM * free_gib:
        return False, (f"off: the largest micro-batch ({max_tokens} tokens) needs ~{need:.1f} GiB without it, "
                       f"{free_gib:.1f} GiB free")
    return True, (f"on: without it the largest micro-batch ({max_tokens} tokens) would need ~{need:.1f} GiB "
                  f"of {free_gib:.1f} GiB free")


# a long row: from this many tokens in a micro-batch, training.tiled_mlp and
# training.cudnn_attention (auto) turn on
LONG_ROW_TOKENS = 32768


def tiled_mlp_tile(hidden_size: int) -> int:
    """Tokens per MLP tile: the hidden size (DeepSpeed's default), at least 1024."""
    return max(1024, int(hidden_size))


def _resid_bytes(cfg, dtype: str) -> int:
    """Bytes of one residual-stream value (a checkpointed layer input): fp32 under QLoRA's fp32
    upcast or in an fp32 run, else 2."""
    bits = cfg.quantization.bits if cfg.method == "qlora" else None
    return 4 if (bits and cfg.quantization.fp32_upcast) or dtype == "float32" else 2


PINNED_MAX = 128 * 2 ** 20  # saved tensors this big or bigger are offloaded to pageable RAM (core.train)
HOST_HEADROOM = 0.8  # offload activations only into <= 80% of the RAM the OS says is available


def host_available_gib() -> float:
    """RAM the OS can give this process now (Linux MemAvailable); inf where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return float("inf")


def offloaded_gib(cfg, arch: dict) -> float:
    """CPU RAM that training.offload_activations fills: each layer's checkpointed input, plus
    the final norm's and the loss's inputs. Below PINNED_MAX a tensor goes to pinned
    RAM, which torch rounds up to a power of two; above it, to plain RAM at its size (a 2.66 GiB
    layer input of 348k tokens pinned 4 GiB, and 32 of them got an 8B run OOM-killed on a 125 GiB
    host, docs/BENCHMARKS.md)."""
    d = _dims(arch)
    resid = _resid_bytes(cfg, _resolved(cfg)["dtype"])
    per_layer = cfg.template.cutoff_len * cfg.training.micro_batch_size * resid * d["H"]
    if per_layer < PINNED_MAX:
        per_layer = 1 << max(0, per_layer - 1).bit_length()
    return (d["L"] + 2) * per_layer / GIB


def memory_plan(cfg, arch: dict | None, max_tokens: int, budget_gib: float,
                host_gib: float | None = None) -> tuple[dict, list[str]]:
    """The auto memory settings of a one-GPU run, fastest first, given the dataset's largest
    micro-batch (max_tokens) and the memory this run may use (budget_gib): checkpointing off if
    that fits with headroom; fused AdamW if it fits, else paged_adamw_8bit; QLoRA embeddings in CPU
    RAM only if still short; activations in CPU RAM only if still short and the host's available
    RAM (host_gib, read from the OS when None) holds them. Only fields left at auto are decided.
    Returns ({dotted field: value}, reasons)."""
    t = cfg.training
    out: dict = {}
    why: list[str] = []
    long_row = max_tokens >= LONG_ROW_TOKENS
    long_why = f"the largest micro-batch has {max_tokens} tokens (>= {LONG_ROW_TOKENS})"
    if t.tiled_mlp == "auto":
        out["training.tiled_mlp"] = long_row
        if long_row:
            cfg = cfg.model_copy(deep=True)
            cfg.training.tiled_mlp = True
            why.append(f"tiled MLP: {long_why}")
        t = cfg.training
    if t.cudnn_attention == "auto":  # speed only, no memory: one plan per length is paid back on long rows
        out["training.cudnn_attention"] = long_row
        if long_row:
            why.append(f"cuDNN attention: {long_why}")
    if t.gradient_checkpointing == "auto":
        gc, reason = checkpointing_decision(cfg, arch, max_tokens, budget_gib)
        out["training.gradient_checkpointing"] = gc
        why.append(f"gradient checkpointing {reason}")
    if arch is None:
        if t.optimizer == "auto":
            out["training.optimizer"] = "adamw_torch_fused"
        if cfg.model.embeddings_on_cpu == "auto":
            out["model.embeddings_on_cpu"] = False
        if t.offload_activations == "auto":
            out["training.offload_activations"] = False
        return out, why
    c = _at_tokens(cfg, max_tokens)
    if "training.gradient_checkpointing" in out:
        c.training.gradient_checkpointing = out["training.gradient_checkpointing"]
    if cfg.model.embeddings_on_cpu == "auto":
        c.model.embeddings_on_cpu = False
    if t.optimizer == "auto":
        c.training.optimizer = "adamw_torch_fused"
        need = _total_gib(c, arch)
        if need > budget_gib:
            c.training.optimizer = "paged_adamw_8bit"
            why.append(f"optimizer paged_adamw_8bit: fused AdamW would need ~{need:.1f} GiB of {budget_gib:.1f}")
        out["training.optimizer"] = c.training.optimizer
    if cfg.model.embeddings_on_cpu == "auto":
        need = _total_gib(c, arch)
        cpu = cfg.method == "qlora" and need > budget_gib and not arch.get("tie_word_embeddings")
        if cpu:
            c.model.embeddings_on_cpu = True
            why.append(f"embeddings in CPU RAM: ~{need:.1f} GiB needed with them on the GPU, {budget_gib:.1f} available")
        out["model.embeddings_on_cpu"] = cpu
    if t.offload_activations == "auto":
        need = _total_gib(c, arch)
        off = need > budget_gib and c.training.gradient_checkpointing is True
        if off:
            host = host_available_gib() if host_gib is None else host_gib
            ram = offloaded_gib(c, arch)
            if ram > HOST_HEADROOM * host:
                off = False
                why.append(f"activations stay on the GPU: in CPU RAM they would need ~{ram:.1f} GiB, "
                           f"{host:.1f} GiB available (shorter rows or a smaller micro-batch)")
        if off:
            c.training.offload_activations = True
            why.append(f"activations in CPU RAM (~{ram:.1f} GiB): ~{need:.1f} GiB needed with them on the GPU, "
                       f"{budget_gib:.1f} available")
        out["training.offload_activations"] = off
    need = _total_gib(c, arch)
    why.append(f"estimated peak ~{need:.1f} GiB of {budget_gib:.1f} GiB" + ("" if need <= budget_gib else " (may not fit)"))
    return out, why


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
    """Concrete changes, each with its `--set` overrides and new estimated total; best first."""
    out: list[dict] = []
    t = cfg.training

    def add(text, **ov):
        try:
            new = _with(cfg, **ov)
        except Exception:  # noqa: BLE001 - an override that doesn't validate is not a suggestion
            return
        total = _total_gib(new, arch)
        sets = [f"{k.replace('__', '.')}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in ov.items()]
        out.append(dict(text=text, set=sets, total_gib=total, fits=total <= gpu_mem_gib))

    if _resolved(cfg)["gradient_checkpointing"] is False:
        add("turn gradient checkpointing on (recomputes activations: ~30% slower, far less memory)",
            training__gradient_checkpointing=True)
    if t.micro_batch_size > 1:
        acc = t.grad_accum * t.micro_batch_size
        add(f"micro-batch 1 with accumulation {acc} (same effective batch of {acc})",
            training__micro_batch_size=1, training__grad_accum=acc)
    cut = cfg.template.cutoff_len
    while cut > 256:
        cut //= 2
        if _total_gib(_with(cfg, template__cutoff_len=cut), arch) <= gpu_mem_gib or cut <= 256:
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
        while cut > 256 and _total_gib(_with(cfg, template__cutoff_len=cut, **combo), arch) > gpu_mem_gib:
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


# ---------------------------------------------------------------- text forms

_LABELS = {"weights": "weights", "lora": "LoRA params + grads + AdamW (fp32)", "gradients": "gradients",
           "optimizer": "optimizer state (AdamW)", "optimizer_step_temp": "optimizer step temporaries",
           "activations": "activations", "logits": "logits + loss", "dequant_buffer": "4-bit dequant buffer",
           "allocator_margin": "allocator margin", "cuda_context": "CUDA context"}


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
        lines.append(f"  {_LABELS.get(k, k):<38} {v:7.2f} GiB")
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


def format_markdown(est: dict) -> str:
    rows = "\n".join(f"| {_LABELS.get(k, k)} | {v:.2f} GiB |" for k, v in est["components"].items())
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


def preset_comment(est: dict) -> str:
    return f"# estimated peak VRAM: {est['total_rounded']} GiB (lorastudio estimate)"


def estimate_markdown(cfg_or_dict, gpu_mem: str | float | None = None) -> str:
    """UI helper: markdown for a RunConfig (or its dict); errors become one line, never raise."""
    from .config import ConfigError, RunConfig, from_dict

    try:
        cfg = cfg_or_dict if isinstance(cfg_or_dict, RunConfig) else from_dict(cfg_or_dict)
        if cfg.model.name_or_path.strip() == "builtin:tiny":
            return TINY_NOTE
        return format_markdown(estimate(cfg, gpu_mem_gib=parse_gpu_mem(gpu_mem)))
    except (ConfigError, EstimateError, ValueError, KeyError) as e:
        return f"VRAM estimate unavailable: {e}"


TINY_NOTE = "VRAM estimate: the embedded tiny model (builtin:tiny) needs well under 1 GiB; it trains on CPU too."


def model_markdown(name_or_path: str, gpu_mem: str | float | None = None) -> str:
    """UI helper for the Model tab: peak VRAM of LoRA, QLoRA and full fine-tuning of this model at
    the default knobs (cutoff 1024, micro-batch 4); never raises."""
    from .config import RunConfig

    name = (name_or_path or "").strip() or "builtin:tiny"
    if name == "builtin:tiny":
        return TINY_NOTE
    try:
        arch = arch_for(name)
        gpu = parse_gpu_mem(gpu_mem)
        rows = []
        for method in ("qlora", "lora", "full"):
            cfg = RunConfig.model_validate({"model": {"name_or_path": name}, "method": method})
            est = estimate(cfg, arch, gpu_mem_gib=gpu, detect=gpu is None)
            fit = "" if est["fits"] is None else (" ✓ fits" if est["fits"] else " ✗ does not fit")
            rows.append(f"| {method} | {est['total_rounded']} GiB{fit} |")
        card = est["gpu_mem_gib"]
        head = f"**Estimated peak VRAM** (cutoff 1024, micro-batch 4{f', vs {card:.0f} GiB' if card else ''})"
        return head + "\n\n| method | peak |\n|---|---|\n" + "\n".join(rows)
    except (EstimateError, ValueError, KeyError) as e:
        return f"VRAM estimate unavailable: {e}"
