"""The memory model: peak GPU memory, by component, of a resolved RunConfig.

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
    norms     2 x 4H            (RMSNorm saves its fp32 input copy; liger's kernel, training.kernels
                                 all: its input in the compute dtype, 2 x bH)  [+4H more for Gemma-2]
    norm outs 2 x bH            (the input of the attention and MLP linears)
    attention b(2Hq + 2Hkv)     (rotated q, k, v and the SDPA output; flash/mem-efficient SDPA,
                                 no s^2 term. eager attention adds 16 bytes x heads x s per token:
                                 scores, softcapping, softmax in fp32, probabilities)
    MLP       4 bI              (gate, act(gate), up, act*up; liger's SwiGLU recomputes act(gate)
                                 in backward: 3 bI)
    LoRA      nothing more with dropout 0 (lora_A saves the same input tensor as the base layer:
              bitsandbytes layers skip PEFT's input cast under autocast, and the product turns it
              off for 16-bit layers); with dropout > 0, b x in (the dropped copy) + 1 x in (the mask)
              per targeted linear
    measured  + 2bH             (the allocator's peak on the 8B, H200, 2,112-2,176-token batches,
                                 exceeds the lines above by ~16 KB a token a layer: the attention
                                 output's contiguous copy for o_proj is one bH, the rest unattributed)
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
  static: reserved-but-unallocated blocks of torch's caching allocator). The training child runs
  the expandable-segments allocator (ALLOC_CONF, unless PYTORCH_CUDA_ALLOC_CONF says otherwise):
  with batches of varying length the classic one left 0.9-2.9 GiB reserved over allocated on the
  8B (two calls, same rows), the expandable one 0.3.

core.estimate compares the total with a card and suggests changes; core.resolve.plan uses it to
pick the auto memory settings of a run.
"""

from __future__ import annotations

import os
from pathlib import Path

from .arch import dims, linear_shapes, lora_params, param_counts

GIB = 1024 ** 3
CUDA_CONTEXT_GIB = 0.75  # CUDA context + cuBLAS workspace + loaded kernels: device used - reserved, H200 (torch 2.11, CUDA 13)
ALLOC_CONF = "expandable_segments:True"  # the training child's PYTORCH_CUDA_ALLOC_CONF unless the user set one
FRAGMENTATION = 0.10  # extra reserved over allocated for the dynamic part (activations, logits), classic allocator
FRAGMENTATION_EXPANDABLE = 0.03  # the same under expandable segments (0.31 GiB of ~11 on the 8B)
STATIC_SLACK = 0.02  # and for the static part (weights, grads, optimizer state)
LOGITS_BYTES = 12  # bytes per logit at the loss peak: bf16 logits (2) + fp32 upcast (4) + log-softmax (4) + ...
SOFTCAP_LOGITS_BYTES = 4  # Gemma-2 final_logit_softcapping: the scaled and tanh'd copies
EAGER_SCORE_BYTES = 16  # eager attention, per head x s x s: scores, softcap, fp32 softmax, probabilities
NF4_BLOCK = 64

# the components by name, as people read them
LABELS = {"weights": "weights", "lora": "LoRA params + grads + AdamW (fp32)", "gradients": "gradients",
           "optimizer": "optimizer state (AdamW)", "optimizer_step_temp": "optimizer step temporaries",
           "activations": "activations", "logits": "logits + loss", "dequant_buffer": "4-bit dequant buffer",
           "allocator_margin": "allocator margin", "cuda_context": "CUDA context"}


def _settings(cfg) -> dict:
    """The resolved values the model reads (the estimate's "assumes" line)."""
    t = cfg.training
    if cfg.model.dtype == "auto" or t.device == "auto":
        raise ValueError("the memory model needs a resolved config (core.resolve.for_estimate)")
    return dict(device=t.device, dtype=cfg.model.dtype, gradient_checkpointing=t.gradient_checkpointing is True,
                optimizer=t.optimizer, kernels=t.kernels, embeddings_on_cpu=cfg.model.embeddings_on_cpu is True,
                offload_activations=t.offload_activations is True, tiled_mlp=t.tiled_mlp is True)


def breakdown(cfg, arch: dict) -> dict:
    """Bytes by component for a config whose machine-dependent values are resolved (core.resolve;
    a memory setting still at auto counts as off)."""
    r = _settings(cfg)
    d = dims(arch)
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
        if cfg.training.fused_lora is True:  # + the step's compute-dtype copies (fused_lora.compute_weights)
            comp["lora"] += n_lora * b
        trainable = n_lora
    else:
        comp["gradients"] = pc["total"] * b
        comp["optimizer"] = pc["total"] * state_bytes
        trainable = pc["total"]

    # activations, per token per layer (see the module docstring)
    tokens = cfg.template.cutoff_len * cfg.training.micro_batch_size
    resid = _resid_bytes(cfg, r["dtype"])
    norms = arch.get("norms_per_layer", 2)
    liger = r["kernels"] == "all"  # liger's RMSNorm and SwiGLU save less (see above)
    mlp = (3 if liger else 4) * b * I
    per_layer = norms * (b if liger else 4) * H + 2 * b * H + b * (2 * Hq + 2 * Hkv) + mlp + 2 * b * H
    tile = tiled_mlp_tile(H)
    if r["tiled_mlp"] and tokens > tile:  # the MLP's intermediates: one tile at a time
        per_layer -= mlp * (1 - tile / tokens)
    if method == "full":
        per_layer += 2 * b * H
    else:
        shapes = linear_shapes(arch)
        per_in = (b + 1) if cfg.lora.dropout > 0 else 0
        per_layer += sum(shapes[t][0] for t in targets) * per_in
    if cfg.model.attn_implementation == "eager":
        per_layer += EAGER_SCORE_BYTES * d["nh"] * cfg.template.cutoff_len
    offload = r["offload_activations"]  # saved tensors in CPU RAM: only the layer being recomputed stays
    k = r["checkpointed_layers"] = checkpointed_layers(cfg, L)
    tiled = r["tiled_mlp"] and tokens > tile  # the tiles already keep only the MLP's input
    m = r["mlp_recompute_layers"] = 0 if (offload or tiled) else mlp_layers(cfg, L, k)
    if offload:
        act = tokens * per_layer + (tokens * 2 * b * H if k else 0)
    else:
        # k layers keep only their input; m keep everything but their MLP's intermediates
        # (core.fused_lora.LoRAMLP); the others everything. In backward one layer at a time is
        # recomputed (a whole layer, or an MLP's gate, up, product and its gradient: 4 x bI with
        # liger's in-place SiLU-mul, 6 x bI with torch's)
        extra = max((per_layer + 2 * b * H) if k else 0, ((4 if liger else 6) * b * I) if m else 0)
        act = tokens * (k * resid * H + m * (per_layer - mlp) + (L - k - m) * per_layer + extra)
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
    comp["allocator_margin"] = _fragmentation() * dynamic + STATIC_SLACK * static
    if r["device"] == "cuda":
        comp["cuda_context"] = CUDA_CONTEXT_GIB * GIB
    return dict(components=comp, resolved=r, params_total=pc["total"], params_trainable=trainable,
                lora_targets=targets, tokens_per_step=tokens, params=pc)


def use_allocator() -> None:
    """The training child's CUDA allocator settings, before torch's first CUDA allocation (the
    user's own PYTORCH_CUDA_ALLOC_CONF wins): fewer GiB lost to fragmentation, the same speed."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)


def _fragmentation() -> float:
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF).replace(" ", "")
    return FRAGMENTATION_EXPANDABLE if "expandable_segments:True" in conf else FRAGMENTATION


def checkpointed_layers(cfg, n_layers: int) -> int:
    """Decoder layers that recompute in backward: training.checkpoint_layers of them under
    checkpointing ("all", or auto still unplanned: every one), none without."""
    t = cfg.training
    if t.gradient_checkpointing is not True:
        return 0
    return n_layers if isinstance(t.checkpoint_layers, str) else min(t.checkpoint_layers, n_layers)


def mlp_layers(cfg, n_layers: int, k: int | None = None) -> int:
    """Decoder layers whose MLP recomputes its intermediates in backward (training.mlp_recompute)
    beside the k checkpointed ones: at most the n_layers - k others; 0 and auto (unplanned): none."""
    v = cfg.training.mlp_recompute
    if v in ("auto", 0) or cfg.method == "full":
        return 0
    k = checkpointed_layers(cfg, n_layers) if k is None else k
    return n_layers - k if v == "all" else min(v, n_layers - k)


def mlp_recompute_possible(cfg, arch: dict) -> bool:
    """Whether this run's MLPs can recompute (core.fused_lora.LoRAMLP): LoRA or 4-bit QLoRA with
    fused LoRA layers (dropout 0, no DoRA), gated MLPs (gate/up/down), no tiled MLP."""
    t = cfg.training
    bits = cfg.quantization.bits if cfg.method == "qlora" else None
    return (cfg.method in ("lora", "qlora") and bits != 8 and t.fused_lora is True and t.tiled_mlp is not True
            and all(p in linear_shapes(arch) for p in ("gate_proj", "up_proj", "down_proj")))


def total_gib(cfg, arch) -> float:
    return sum(breakdown(cfg, arch)["components"].values()) / GIB


def round_gib(x: float) -> float:
    return round(x, 1)


# a layer skips recompute only while the estimate uses <= 95% of free memory (the estimate was
# 1% under to 6% over the measured peak in every budgeted 8B/1.5B run on the H200, docs/BENCHMARKS.md)
CHECKPOINTING_HEADROOM = 0.95


def at_tokens(cfg, max_tokens: int):
    """A copy of cfg whose estimate counts max_tokens per micro-batch (tokens = cutoff_len x mb)."""
    c = cfg.model_copy(deep=True)
    c.template.cutoff_len = max(1, -(-max_tokens // c.training.micro_batch_size))
    return c


def _mlp_cost(arch: dict) -> float:
    """One MLP's recompute (gate and up again) as a share of its layer's forward + backward matmuls."""
    shapes = linear_shapes(arch)
    layer = sum(i * o for i, o in shapes.values())
    return sum(shapes[p][0] * shapes[p][1] for p in ("gate_proj", "up_proj")) / (3 * layer)


def checkpointing_decision(cfg, arch: dict | None, max_tokens: int,
                           free_gib: float) -> tuple[bool, int | str, int | str, str]:
    """gradient_checkpointing, checkpoint_layers and mlp_recompute at auto on CUDA, decided once
    the data is known: the cheapest recompute with which the largest micro-batch of this dataset
    (max_tokens) fits in free_gib by this estimate, with headroom (fewest_recompute). Each
    checkpointed layer runs its forward twice (~1/3 more of that layer's compute, and a second
    forward's Python: the step is CPU-bound); each recomputing MLP its gate and up matmuls (GPU
    work alone). Every layer when even that does not fit or the architecture is unknown (the rest
    of the plan then finds memory elsewhere). An explicit count or mlp_recompute is kept.
    Returns (checkpointing, layers, MLPs recomputing, reason)."""
    mlp_set = cfg.training.mlp_recompute
    if arch is None:
        return True, "all", 0 if mlp_set == "auto" else mlp_set, "on: unknown architecture"
    L = dims(arch)["L"]
    layers = cfg.training.checkpoint_layers  # an explicit count is kept; auto is searched
    need = _need(cfg, arch, max_tokens)
    light = _light(cfg, arch)
    if need(0, 0 if light else None) <= CHECKPOINTING_HEADROOM * free_gib:
        k, m = 0, 0
    elif layers == "auto":
        k, m = fewest_recompute(cfg, arch, max_tokens, free_gib)
    else:
        k = L if layers == "all" else min(layers, L)
        m = L - k if light else 0
    gib = need(k, m if light else None)
    # checkpointed layers: every other layer's MLP recomputes ("all", which also lets each batch
    # choose its own under checkpoint_per_batch, layers_by_batch); none: the fewest MLPs
    mlps = (m if k == 0 else "all") if light else (0 if mlp_set == "auto" else mlp_set)
    batch = f"the largest micro-batch ({max_tokens} tokens)"
    plain = need(0, 0 if light else None)
    if k == 0 and not (light and m):
        return False, layers if isinstance(layers, int) else "all", mlps, (
            f"off: {batch} needs ~{gib:.1f} GiB without it, {free_gib:.1f} GiB free")
    mlp_cost = f"~{m / L * _mlp_cost(arch):.0%} more compute, on the GPU alone" if light and m else ""
    if k == 0:
        return False, layers if isinstance(layers, int) else "all", mlps, (
            f"off; the MLPs of the last {m} of {L} layers recompute gate and up in backward, the fewest that fit: "
            f"{batch} needs ~{gib:.1f} GiB of {free_gib:.1f} GiB free ({mlp_cost}; without it ~{plain:.1f} GiB)")
    mlp_words = f"the MLPs of the {m} other layers recompute gate and up ({mlp_cost})" if mlp_cost else ""
    cost = f"recompute adds ~{k / L / 3:.0%} compute a step" + (f"; {mlp_words}" if mlp_words else "")
    value = k if isinstance(layers, int) or k < L else "all"
    if k == L:
        return True, value, mlps, (f"on, every layer: without it {batch} would need ~{plain:.1f} GiB of "
                                   f"{free_gib:.1f} GiB free ({cost})")
    return True, value, mlps, (f"on for {k} of {L} layers, the fewest that fit: {batch} needs ~{gib:.1f} GiB "
                               f"of {free_gib:.1f} GiB free ({cost}; without checkpointing ~{plain:.1f} GiB)")


def _light(cfg, arch: dict) -> bool:
    """The plan may make MLPs recompute: training.mlp_recompute at auto, and this run's MLPs can."""
    return cfg.training.mlp_recompute == "auto" and mlp_recompute_possible(cfg, arch)


def _need(cfg, arch: dict, tokens: int):
    """GiB as a function of the checkpointed layers k (0: checkpointing off) and the MLPs that
    recompute m (None: the config's own mlp_recompute), at tokens a micro-batch."""
    c = at_tokens(cfg, tokens)

    def need(k: int, m: int | None = None) -> float:
        c.training.gradient_checkpointing = k > 0
        if k:
            c.training.checkpoint_layers = k
        if m is not None:
            c.training.mlp_recompute = m
        return total_gib(c, arch)

    return need


def fewest_recompute(cfg, arch: dict, tokens: int, free_gib: float) -> tuple[int, int]:
    """(checkpointed layers, recomputing MLPs): the cheapest with which a micro-batch of tokens
    fits free_gib with headroom. None when it fits; where the plan may make MLPs recompute
    (mlp_recompute auto), the fewest MLPs alone, else the fewest checkpointed layers with every
    other layer's MLP recomputing (an MLP's recompute is a second gate/up matmul on the GPU; a
    checkpointed layer's is a second forward with its Python, and a QLoRA step is CPU-bound);
    without MLP recompute, the fewest checkpointed layers. Every layer when none fits. Memory
    falls with each layer checkpointed from the second on (the first only adds the recompute
    buffer)."""
    need, fit, L = _need(cfg, arch, tokens), CHECKPOINTING_HEADROOM * free_gib, dims(arch)["L"]
    light = _light(cfg, arch)
    if need(0, 0 if light else None) <= fit:
        return 0, 0

    def smallest(lo: int, fits) -> int:  # the smallest n in [lo, L] that fits, else L
        hi = L
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
        return lo

    if light and need(0, L) <= fit:
        return 0, smallest(1, lambda m: need(0, m) <= fit)
    if light:
        k = smallest(1, lambda k: need(k, L - k) <= fit)
        return k, L - k
    return smallest(2, lambda k: need(k) <= fit), 0


def fewest_layers(cfg, arch: dict, tokens: int, free_gib: float) -> int:
    """The checkpointed layers of fewest_recompute."""
    return fewest_recompute(cfg, arch, tokens, free_gib)[0]


def layers_by_batch(cfg, arch: dict, free_gib: float, most: int):
    """training.checkpoint_per_batch: a function of a micro-batch's tokens giving the fewest
    checkpointed layers that batch needs, at most `most` (the plan's count for the longest):
    short batches skip the recompute the longest one needs. Where MLPs may recompute (the plan
    chose some, or mlp_recompute auto), its `mlp` attribute gives the MLPs that recompute for
    that batch (fewest_recompute: these first, layers only when they are not enough). Memoised
    (rows come padded to a multiple of 64, so few lengths recur)."""
    cache: dict[int, tuple[int, int]] = {}
    L = dims(arch)["L"]
    light = cfg.training.mlp_recompute != 0 and mlp_recompute_possible(cfg, arch)
    if light:
        cfg = cfg.model_copy(deep=True)
        cfg.training.mlp_recompute = "auto"  # searched per batch

    def plan(tokens: int) -> tuple[int, int]:
        if tokens not in cache:
            k, m = fewest_recompute(cfg, arch, tokens, free_gib)
            if k > most:
                k, m = most, (L - most if light else 0)
            cache[tokens] = (k, m)
        return cache[tokens]

    def layers(tokens: int) -> int:
        return plan(tokens)[0]

    if light:
        layers.mlp = lambda tokens: plan(tokens)[1]
    return layers


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
    d = dims(arch)
    resid = _resid_bytes(cfg, cfg.model.dtype)
    per_layer = cfg.template.cutoff_len * cfg.training.micro_batch_size * resid * d["H"]
    if per_layer < PINNED_MAX:
        per_layer = 1 << max(0, per_layer - 1).bit_length()
    return (d["L"] + 2) * per_layer / GIB
