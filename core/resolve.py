"""The one resolver of `auto` values, in three stages: config -> machine -> data.

  1. config   core.config.load / from_dict: the file, validated; values may still say "auto".
  2. machine  resolve(cfg, machine): what depends on the device (dtype, kernels, the optimizer of
              CPU and sharded runs, padding, the fast paths that need CUDA), for the machine probed
              here (the training child, `lorastudio train`) or one assumed without asking torch
              (the estimator, the distributed dry run, the web app: a CUDA card).
  3. data     plan(cfg, arch, max_tokens, budget_gib): the memory settings of a one-GPU CUDA run
              once its largest micro-batch is known (the training child), or at cutoff_len x
              micro-batch on a named card (the estimator). unplanned(cfg): what a field still at
              auto takes before any data is known (the estimator's figures, build_trainer alone).

Every caller that needs a concrete value asks these functions; nothing else decides an auto.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass


from . import machine as machine_lib
from . import memory, tiny
from .config import ConfigError, RunConfig


@dataclass(frozen=True)
class Machine:
    device: str  # "cuda" or "cpu"
    bf16: bool = True  # the card computes in bfloat16 (else float16)
    liger: bool = False  # liger-kernel and triton are importable
    probed: bool = False  # measured here (False: assumed, so nothing about this host is checked)
    torch: str = ""  # torch.__version__ where probed


def liger_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("liger_kernel", "triton"))


def probe(requested: str = "auto") -> Machine:
    """This machine, as torch sees it (imports torch)."""
    import torch

    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise ConfigError("training.device: cuda requested but no CUDA GPU is visible")
    device = requested if requested != "auto" else ("cuda" if cuda else "cpu")
    return Machine(device=device, bf16=bool(cuda and torch.cuda.is_bf16_supported()), liger=liger_available(),
                   probed=True, torch=torch.__version__)


@functools.lru_cache(maxsize=4)
def _probe_in_child(requested: str) -> Machine:
    out = subprocess.run([sys.executable, "-m", "lorastudio.core.resolve", "--probe", requested],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        raise ConfigError(lines[-1].removeprefix("error: ") if lines else "could not probe this machine")
    return Machine(**json.loads(out.stdout.strip().splitlines()[-1]))


def probe_here_or_in_child(requested: str = "auto") -> Machine:
    """probe(), in this process when torch is already loaded, else once in a child process (the
    web app's process never loads torch; the machine does not change while it serves)."""
    return probe(requested) if "torch" in sys.modules else _probe_in_child(requested)


def assumed(requested: str = "auto") -> Machine:
    """A machine named, not measured: a bf16 CUDA card unless the config says cpu (no torch)."""
    device = "cpu" if requested == "cpu" else "cuda"
    return Machine(device=device, bf16=True, liger=device == "cuda" and liger_available())


# ---------------------------------------------------------------- stage 2: the machine

def resolve(cfg: RunConfig, machine: Machine | None = None) -> RunConfig:
    """A copy of cfg with every machine-dependent auto filled (the probed machine by default);
    raises ConfigError naming the field of a combination this machine cannot run."""
    m = machine or probe(cfg.training.device)
    cfg = cfg.model_copy(deep=True)
    t = cfg.training
    device = t.device = m.device
    if cfg.model.dtype == "auto":
        # bf16 on CPU is far slower and less exact
        cfg.model.dtype = ("bfloat16" if m.bf16 else "float16") if device == "cuda" else "float32"
    if device == "cpu" and cfg.model.dtype != "float32":
        raise ConfigError(f"model.dtype: {cfg.model.dtype} training on CPU is not supported; use float32 or auto")
    if cfg.stage != "sft" or cfg.model.adapter_from:
        from . import stage

        stage.resolve(cfg)  # before the autos below: the preference trainers take no fused path
    if t.gradient_checkpointing == "auto" and device == "cpu":
        t.gradient_checkpointing = False  # CUDA: stage 3, once the data is known
    if t.checkpoint_layers == "auto" and (t.gradient_checkpointing != "auto" or t.gpus > 1):
        # planned (stage 3) only with checkpointing at auto on one GPU: an explicit `true`
        # means every layer, as it always has
        t.checkpoint_layers = "all"  # (moot while checkpointing is off)
    if t.checkpoint_per_batch == "auto" and t.checkpoint_layers != "auto":
        t.checkpoint_per_batch = False  # only a planned count is varied by batch
    if t.checkpoint_per_batch is True and (t.gpus > 1 or device != "cuda"):
        raise ConfigError("training.checkpoint_per_batch: one CUDA GPU only (or auto)")
    if t.checkpoint_per_batch is True and t.offload_activations is True:
        raise ConfigError("training.checkpoint_per_batch: not with offload_activations (a layer that skipped "
                          "recompute would send all its activations to CPU RAM)")
    if t.offload_activations is True and t.checkpoint_reentrant is False:
        raise ConfigError("training.offload_activations: needs checkpoint_reentrant true (or auto): the reentrant "
                          "checkpoint keeps each layer's input in the one place offloading moves to CPU RAM")
    if t.checkpoint_reentrant == "auto":
        t.checkpoint_reentrant = t.gpus == 1 or t.offload_activations is True
    if t.offload_activations is True and isinstance(t.checkpoint_layers, int):
        raise ConfigError("training.offload_activations: needs checkpoint_layers all (or auto): offloading "
                          "moves every saved activation to CPU RAM, the layers that skip recompute too")
    if t.exclusive == "auto":
        t.exclusive = True  # one training job per device, CPU included (2 cores shared by ten runs help none)
    if cfg.template.padding_free == "auto":
        # off for remote code (its attention may ignore position_ids) and NEFTune (its noise is
        # scaled by the row's length, which a padding-free row multiplies)
        cfg.template.padding_free = not cfg.model.trust_remote_code and t.neftune_alpha is None
    if cfg.template.pad_to_multiple_of == "auto":
        cfg.template.pad_to_multiple_of = 64 if device == "cuda" else 1
    if t.kernels == "auto":
        t.kernels = "all" if device == "cuda" and m.liger else "off"
    elif t.kernels != "off" and device != "cuda":
        raise ConfigError(f"training.kernels: {t.kernels} needs CUDA (liger-kernel is Triton); use off or auto")
    elif t.kernels != "off" and not m.liger and m.probed:  # an assumed machine: as if installed there
        raise ConfigError(f"training.kernels: {t.kernels} needs liger-kernel: pip install 'lorastudio[gpu]' "
                          "(or kernels: auto)")
    sharded = t.gpus > 1 and t.strategy in ("fsdp", "zero3")
    if t.fused_lora == "auto":
        t.fused_lora = (device == "cuda" and cfg.method in ("lora", "qlora") and cfg.lora.dropout == 0
                        and not cfg.lora.use_dora and not sharded)
    if t.mlp_recompute not in ("auto", 0) and not (cfg.method in ("lora", "qlora") and t.fused_lora is True
                                                   and not (cfg.method == "qlora" and cfg.quantization.bits == 8)):
        raise ConfigError("training.mlp_recompute: needs fused LoRA layers (training.fused_lora: LoRA or 4-bit "
                          "QLoRA, dropout 0, no DoRA); use 0 (or auto)")
    if t.mlp_recompute == "auto" and (device != "cuda" or t.gpus > 1 or t.fused_lora is not True):
        t.mlp_recompute = 0  # one CUDA GPU with fused LoRA: stage 3
    dropout = cfg.method != "full" and cfg.lora.dropout > 0
    if t.tiled_mlp is True and dropout:
        raise ConfigError("training.tiled_mlp: needs lora.dropout 0 (the backward recomputes each tile, "
                          "which would draw new dropout masks)")
    if t.tiled_mlp is True and t.gpus > 1:
        raise ConfigError("training.tiled_mlp: one GPU only for now (its backward accumulates gradients "
                          "outside the gradient hooks that multi-GPU strategies rely on)")
    if t.tiled_mlp == "auto" and (device != "cuda" or t.gpus > 1 or dropout):
        t.tiled_mlp = False  # one CUDA GPU: stage 3
    if t.cudnn_attention is True and device != "cuda":
        raise ConfigError("training.cudnn_attention: CUDA only (or cudnn_attention: auto)")
    if t.cudnn_attention == "auto" and device != "cuda":
        t.cudnn_attention = False  # CUDA: stage 3
    if t.optimizer == "auto" and (device != "cuda" or sharded):
        # sharded runs: plain torch AdamW (state sharded with the params). One GPU: stage 3 picks
        # torch's fused AdamW, one kernel for every LoRA tensor, or bitsandbytes' 8-bit AdamW
        # (adamw_bnb_8bit, stepped by core.optim without a sync per tensor) when memory is short.
        t.optimizer = "adamw_torch"
    if device != "cuda" or cfg.method != "qlora":
        cfg.model.embeddings_on_cpu = bool(cfg.model.embeddings_on_cpu is True)
    if device != "cuda" and t.offload_activations == "auto":
        t.offload_activations = False
    if cfg.model.embeddings_on_cpu is True and (device != "cuda" or cfg.method != "qlora"):
        raise ConfigError("model.embeddings_on_cpu: only for QLoRA on CUDA")
    if sharded and t.optimizer.startswith("paged_"):
        raise ConfigError(f"training.optimizer: {t.optimizer} cannot be checkpointed under {t.strategy}; "
                          "use adamw_torch (or optimizer: auto)")
    if t.optimizer.startswith("paged_") and device != "cuda":
        raise ConfigError(f"training.optimizer: {t.optimizer} pages optimizer state between GPU and CPU and "
                          "needs CUDA; on CPU use adamw_torch (or optimizer: auto)")
    if m.probed and device == "cpu" and t.gpus > 1:
        problem = machine_lib.gpus_problem(t.gpus, "cpu")
        if problem:
            raise ConfigError(problem)
    if t.gpus > 1 or t.strategy != "ddp":
        _check_multi_gpu(cfg, here=m.probed)
    tiny.pin_config(cfg)  # builtin:tiny -> builtin:tiny@<build>: config.yaml names the build it trains
    cfg.resolved = {"device": device, "torch": m.torch}
    return cfg


def _check_multi_gpu(cfg, here: bool) -> None:
    """GPU count and strategy, once the device is known; raises ConfigError naming the field.
    here=False (a machine assumed, not probed): only what holds on any machine."""
    t = cfg.training
    if here and t.strategy in ("zero2", "zero3") and not machine_lib.deepspeed_installed():
        raise ConfigError(f"training.strategy: {t.strategy} needs DeepSpeed, which is not installed here "
                          "(pip install deepspeed; it compiles CUDA ops); use strategy: fsdp, which needs nothing extra")
    if t.device == "cpu":
        if t.strategy != "ddp":
            raise ConfigError(f"training.strategy: {t.strategy} needs CUDA GPUs; on CPU only ddp (gloo processes) runs")
        return
    if cfg.method == "qlora" and t.strategy == "fsdp" and cfg.model.dtype == "float32":
        raise ConfigError("model.dtype: QLoRA under FSDP stores 4-bit weights in the compute dtype; use bfloat16 or auto")
    if not here:
        return
    import torch

    n = torch.cuda.device_count()
    if t.gpus > n:
        raise ConfigError(f"training.gpus: {t.gpus} requested but only {n} CUDA GPU(s) are visible"
                          + (f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})"
                             if "CUDA_VISIBLE_DEVICES" in os.environ else ""))


# ---------------------------------------------------------------- stage 3: the data

def unplanned(cfg: RunConfig) -> dict:
    """{dotted field: value} for each memory setting still at auto, before any data is known:
    the safe static settings (checkpointing on, fused AdamW, nothing moved to CPU RAM, no long-row
    paths). What the plan gives an unknown architecture, what the estimator's figures assume."""
    t = cfg.training
    defaults = {"training.gradient_checkpointing": t.device != "cpu",
                "training.checkpoint_layers": "all", "training.checkpoint_per_batch": False,
                "training.optimizer": "adamw_torch_fused",
                "model.embeddings_on_cpu": False, "training.offload_activations": False,
                "training.tiled_mlp": False, "training.cudnn_attention": False, "training.mlp_recompute": 0}
    return {k: v for k, v in defaults.items() if _get(cfg, k) == "auto"}


def fill(cfg: RunConfig, values: dict) -> RunConfig:
    """cfg with {dotted field: value} set in place (returns it)."""
    for key, value in values.items():
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, value)
    return cfg


def for_estimate(cfg: RunConfig) -> RunConfig:
    """Stages 2 and 3 on an assumed machine, before data: the config the estimator's figures describe."""
    c = resolve(cfg, assumed(cfg.training.device))
    return fill(c, unplanned(c))  # c is resolve()'s own copy


def _get(cfg, key: str):
    section, field = key.split(".")
    return getattr(getattr(cfg, section), field)


_BY_BATCH = "checkpointed layers by batch: each micro-batch checkpoints the fewest its length needs, at most the count above"


def plan(cfg: RunConfig, arch: dict | None, max_tokens: int, budget_gib: float,
         host_gib: float | None = None, typical_tokens: int | None = None) -> tuple[dict, list[str]]:
    """The auto memory settings of a one-GPU CUDA run (cfg resolved for its machine), fastest
    first, given its largest micro-batch (max_tokens) and the memory it may use (budget_gib):
    checkpointing off if that fits with headroom (else QLoRA embeddings in CPU RAM first, then the
    fewest checkpointed layers that fit); fused AdamW if it fits, else adamw_bnb_8bit; QLoRA
    embeddings in CPU RAM if still short; activations in CPU RAM only if still short and
    the host's available RAM (host_gib, read from the OS when None) holds them; tiled MLP and cuDNN
    attention from memory.LONG_ROW_TOKENS. typical_tokens (a typical micro-batch; default
    max_tokens) decides whether the embeddings go first: only when most batches would recompute.
    Only fields left at auto are decided.
    Returns ({dotted field: value}, reasons)."""
    t = cfg.training
    out: dict = {}
    why: list[str] = []
    long_row = max_tokens >= memory.LONG_ROW_TOKENS
    long_why = f"the largest micro-batch has {max_tokens} tokens (>= {memory.LONG_ROW_TOKENS})"
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
    emb_first = (cfg.model.embeddings_on_cpu == "auto" and cfg.method == "qlora" and arch is not None
                 and not arch.get("tie_word_embeddings") and t.gradient_checkpointing == "auto")
    if emb_first:
        # before layers recompute on most steps: the frozen embedding table in CPU RAM costs a
        # gather and a few MB copied a step, each layer it spares recompute ~2-4 ms (8B QLoRA, H200:
        # +6% at a 16 GiB budget; -7% at 24, where typical batches recompute nothing anyway)
        typical = min(typical_tokens or max_tokens, max_tokens)
        c = fill(memory.at_tokens(cfg, typical), {"training.gradient_checkpointing": False,
                                                  "model.embeddings_on_cpu": False})
        if t.optimizer == "auto":
            c.training.optimizer = "adamw_torch_fused"
        need = memory.total_gib(c, arch)
        if need > memory.CHECKPOINTING_HEADROOM * budget_gib:
            cfg = fill(cfg.model_copy(deep=True), {"model.embeddings_on_cpu": True})
            out["model.embeddings_on_cpu"] = True
            why.append(f"embeddings in CPU RAM: a typical micro-batch ({typical} tokens) would need ~{need:.1f} GiB "
                       f"without checkpointing with them on the GPU, {budget_gib:.1f} available")
        t = cfg.training
    if t.gradient_checkpointing == "auto":
        gc, layers, mlps, reason = memory.checkpointing_decision(cfg, arch, max_tokens, budget_gib)
        out["training.gradient_checkpointing"] = gc
        if t.mlp_recompute == "auto":
            out["training.mlp_recompute"] = mlps
        if t.checkpoint_layers == "auto":
            out["training.checkpoint_layers"] = layers
            if t.checkpoint_per_batch == "auto":
                out["training.checkpoint_per_batch"] = gc and arch is not None
                if gc:
                    why.append(_BY_BATCH)
        why.append(f"gradient checkpointing {reason}")
    if arch is None:
        rest = unplanned(fill(cfg.model_copy(deep=True), out))
        return {**out, **rest}, why
    if t.mlp_recompute == "auto" and "training.mlp_recompute" not in out:
        out["training.mlp_recompute"] = 0  # checkpointing set by hand: MLP recompute only when asked for
    c = fill(memory.at_tokens(cfg, max_tokens),
             {k: v for k, v in out.items() if "checkpoint" in k or k == "training.mlp_recompute"})
    if cfg.model.embeddings_on_cpu == "auto":
        c.model.embeddings_on_cpu = False
    if t.optimizer == "auto":
        c.training.optimizer = "adamw_torch_fused"
    # the cheaper saving first: the (frozen) embedding table in CPU RAM costs a gather and a few
    # MB copied a step; 8-bit AdamW launches a kernel per tensor (448 on the 8B's LoRA)
    if cfg.model.embeddings_on_cpu == "auto":  # (not decided above)
        need = memory.total_gib(c, arch)
        cpu = cfg.method == "qlora" and need > budget_gib and not arch.get("tie_word_embeddings")
        if cpu:
            c.model.embeddings_on_cpu = True
            why.append(f"embeddings in CPU RAM: ~{need:.1f} GiB needed with them on the GPU, {budget_gib:.1f} available")
        out["model.embeddings_on_cpu"] = cpu
    if t.optimizer == "auto":
        need = memory.total_gib(c, arch)
        if need > budget_gib:
            c.training.optimizer = "adamw_bnb_8bit"
            why.append(f"optimizer adamw_bnb_8bit: fused AdamW would need ~{need:.1f} GiB of {budget_gib:.1f}")
        out["training.optimizer"] = c.training.optimizer
    if t.offload_activations == "auto":
        need = memory.total_gib(c, arch)
        off = need > budget_gib and c.training.gradient_checkpointing is True and t.checkpoint_reentrant is True
        if off:
            host = memory.host_available_gib() if host_gib is None else host_gib
            ram = memory.offloaded_gib(c, arch)
            if ram > memory.HOST_HEADROOM * host:
                off = False
                why.append(f"activations stay on the GPU: in CPU RAM they would need ~{ram:.1f} GiB, "
                           f"{host:.1f} GiB available (shorter rows or a smaller micro-batch)")
        if off:
            c.training.offload_activations = True
            why.append(f"activations in CPU RAM (~{ram:.1f} GiB): ~{need:.1f} GiB needed with them on the GPU, "
                       f"{budget_gib:.1f} available")
            if out.get("training.checkpoint_per_batch"):  # offloading keeps every layer checkpointed
                out["training.checkpoint_per_batch"] = False
                why.remove(_BY_BATCH)
            if out.get("training.mlp_recompute"):
                out["training.mlp_recompute"] = 0  # (no layer is left to recompute only its MLP)
        out["training.offload_activations"] = off
    need = memory.total_gib(c, arch)
    why.append(f"estimated peak ~{need:.1f} GiB of {budget_gib:.1f} GiB" + ("" if need <= budget_gib else " (may not fit)"))
    return out, why


if __name__ == "__main__":  # `python -m lorastudio.core.resolve --probe DEVICE`: this machine as JSON
    try:
        print(json.dumps(dataclasses.asdict(probe(sys.argv[2] if len(sys.argv) > 2 else "auto"))))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
