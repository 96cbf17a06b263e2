"""RunConfig: the one typed config for a training run, and its YAML form.

Every knob has a visible default and one line of advice. Errors name the field path
("training.learning_rate: must be > 0"). `resolve()` fills device-dependent values (dtype,
gradient checkpointing, optimizer) so the run directory's config.yaml holds every value used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config problem; the message names the field path(s)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name_or_path: str = "builtin:tiny"  # local folder, hub id, or builtin:tiny (offline default)
    revision: str | None = None  # hub revision (branch, tag or commit) for reproducibility
    trust_remote_code: bool = False  # runs code shipped with the model: only for models you trust
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on capable GPUs, fp32 on CPU
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"
    # QLoRA: keep the input embedding table in CPU RAM (V x H x 2 bytes less GPU memory: 1 GiB on
    # an 8B model; lookups are cheap). auto: only when the run would not fit the GPU otherwise
    embeddings_on_cpu: Literal["auto", True, False] = "auto"


class DataSource(_Section):
    path: str  # json/jsonl/csv/parquet/txt file, or builtin:sample
    format: Literal["auto", "openai", "sharegpt", "alpaca", "guanaco", "xtuner", "text"] = "auto"
    columns: dict[str, str] | None = None  # column-mapping override, e.g. {instruction: question}
    placeholders: dict[str, str] | None = None  # fills {{name}}/{{author}} as in identity data
    ratio: float = Field(1.0, gt=0)  # rows taken = ratio x usable rows (>1 repeats, <1 subsamples)


class DataSection(_Section):
    sources: list[DataSource] = Field(default_factory=lambda: [DataSource(path="builtin:sample")], min_length=1)
    eval_split: float = Field(0.0, ge=0, lt=0.5)  # fraction held out for eval loss (0 = none)
    seed: int = 0  # shuffling and mixing


class TemplateSection(_Section):
    name: str = "auto"  # auto = the tokenizer's own; or chatml, qwen, llama3, mistral, ... or custom
    custom_jinja: str | None = None  # with name: custom; rendered in a sandbox
    cutoff_len: int = Field(1024, gt=0)  # tokens per sample; longer samples are truncated and counted
    packing: bool = False  # pack samples into cutoff_len rows (no cross-sample attention)
    # one row per micro-batch: samples concatenated with restarting position_ids, no pad tokens
    # (same samples per step, same loss, no cross-sample attention); auto: on unless the model
    # runs remote code (its attention may ignore position_ids) or NEFTune is on
    padding_free: Literal["auto", True, False] = "auto"
    # rows padded up to a multiple of this (pad after every real token, label -100): a CUDA step
    # on a few aligned lengths beats one on varying odd ones; auto: 64 on CUDA, 1 (none) on CPU
    pad_to_multiple_of: Literal["auto"] | int = "auto"


class LoraSection(_Section):
    r: int = Field(16, gt=0)  # rank: 8-64 typical; higher = more capacity, more memory
    alpha: float = Field(32, gt=0)  # scale = alpha / r (or alpha / sqrt(r) with rslora)
    dropout: float = Field(0.0, ge=0, lt=1)  # 0 skips a copy of every LoRA input (faster); 0.05-0.1 on tiny datasets
    target_modules: list[str] | str = "all-linear"  # all-linear, or e.g. [q_proj, v_proj]
    use_dora: bool = False  # weight-decomposed LoRA: a bit better, slower
    use_rslora: bool = False  # rank-stabilised scaling, helps at high r


class QuantSection(_Section):
    bits: Literal[4, 8] | None = None  # only with method: qlora (defaults to 4)
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True  # quantise the quantisation constants: ~0.4 bit/param saved
    # stock PEFT (prepare_model_for_kbit_training) upcasts norms, embeddings and lm_head to fp32:
    # +2 GiB on an 8B model and fp32 logits, for no measured gain; on only to reproduce it
    fp32_upcast: bool = False


class TrainingSection(_Section):
    epochs: float = Field(3.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    micro_batch_size: int = Field(4, gt=0)  # per device; lower it first when out of memory
    grad_accum: int = Field(4, gt=0)  # effective batch = micro_batch_size x grad_accum
    learning_rate: float = Field(2e-4, gt=0)  # LoRA: 1e-4..5e-4; full fine-tuning: 1e-5..5e-5
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # auto: adamw_torch_fused on one GPU (paged_adamw_8bit when the run would not fit otherwise), else adamw_torch
    optimizer: str = "auto"
    neftune_alpha: float | None = Field(None, gt=0)  # noisy embeddings (5 is common); None = off
    # recompute activations in backward: less memory, slower steps. auto: off on CPU (12x slower
    # there); on CUDA off when the dataset's largest micro-batch fits the card without it
    gradient_checkpointing: Literal["auto", True, False] = "auto"
    # with checkpointing: each layer's saved input goes to CPU RAM during forward and comes back
    # for its recompute (layers x tokens x hidden x 2 bytes less; slower). auto: only when the
    # run would not fit otherwise (CUDA); the long-context setting
    offload_activations: Literal["auto", True, False] = "auto"
    # liger-kernel (pip install 'lorastudio[gpu]'), CUDA only. loss: fused linear + cross-entropy
    # (never materialises full-vocab logits); all: + RMSNorm, RoPE, SwiGLU kernels;
    # auto: all when liger-kernel is installed, else off
    kernels: Literal["auto", "off", "loss", "all"] = "auto"
    # each LoRA layer as one autograd node (core/fused_lora.py): the same maths with a fraction of
    # the kernel launches (a QLoRA step is CPU-bound). auto: on for CUDA LoRA/QLoRA without dropout
    # or DoRA on one GPU or DDP
    fused_lora: Literal["auto", True, False] = "auto"
    # each decoder MLP over tiles of the row (core/tiled_mlp.py): its intermediates (3 x the MLP
    # width a token, the largest activations of a long row) one tile at a time, for an extra MLP
    # forward. auto: on for one CUDA GPU, LoRA dropout 0, when a micro-batch reaches 32k tokens
    tiled_mlp: Literal["auto", True, False] = "auto"
    # cuDNN attention (SDPA's first choice on Hopper): the fastest kernel on a long row, but it
    # builds a plan for every new row length, CPU time each step when short rows vary.
    # auto: on for CUDA when a micro-batch reaches 32k tokens (attention then dominates a step)
    cudnn_attention: Literal["auto", True, False] = "auto"
    seed: int = 42
    logging_steps: int = Field(1, gt=0)
    eval_steps: int = Field(50, gt=0)
    save_steps: int = Field(100, gt=0)  # checkpoint every N optimizer steps
    save_total_limit: int = Field(2, gt=0)  # keep the last K checkpoints
    early_stopping_patience: int | None = Field(None, gt=0)  # stop after N evals without a better eval loss; keeps the best
    sample_every: int = Field(0, ge=0)  # sample generations every N steps (0 = only at the end)
    sample_prompts: list[str] = Field(default_factory=list)  # XTuner's evaluation_inputs
    sample_max_new_tokens: int = Field(64, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    exclusive: Literal["auto", True, False] = "auto"  # one job per device (file lock); auto: on for CUDA
    queue: bool = True  # device busy: wait in the queue (True) or refuse at once (False)
    # GPU memory this run may use, per GPU (a shared card, an 8 GB budget); None: the card's free
    # memory at start. The auto settings above pick speed when it fits and savings when not.
    gpu_memory_gib: float | None = Field(None, gt=0)
    gpus: int = Field(1, gt=0)  # processes (one per GPU; on CPU: gloo processes); >1 starts `accelerate launch`
    strategy: Literal["ddp", "fsdp", "zero2", "zero3"] = "ddp"  # ddp: a full copy per GPU; fsdp/zero3 shard the model
    offload: bool = False  # fsdp/zero2/zero3: keep params/optimizer state in CPU RAM (slower, fits bigger models)


class OutputSection(_Section):
    run_name: str | None = None  # default: <model>-<method>-<timestamp>


class RunConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    template: TemplateSection = Field(default_factory=TemplateSection)
    method: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraSection = Field(default_factory=LoraSection)
    quantization: QuantSection = Field(default_factory=QuantSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    output: OutputSection = Field(default_factory=OutputSection)
    resolved: dict[str, Any] = Field(default_factory=dict)  # written by resolve(); informational

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        q = self.quantization
        if self.method == "full" and q.bits is not None:
            raise ValueError("quantization.bits: full fine-tuning cannot train quantized weights; "
                             "use method: qlora, or drop quantization.bits")
        if self.method == "lora" and q.bits is not None:
            raise ValueError("quantization.bits: set method: qlora to train on a quantized base")
        if self.method == "qlora" and q.bits is None:
            q.bits = 4
        t = self.training
        if t.early_stopping_patience is not None:
            if self.data.eval_split <= 0:
                raise ValueError("training.early_stopping_patience: needs an eval split (data.eval_split > 0)")
            if t.save_steps % t.eval_steps:
                raise ValueError(f"training.save_steps: must be a multiple of training.eval_steps ({t.eval_steps}) "
                                 "with early stopping, so the best evaluated step has a checkpoint")
        if t.offload and t.strategy == "ddp":
            raise ValueError("training.offload: needs training.strategy fsdp, zero2 or zero3 (ddp keeps a full copy per GPU)")
        if t.strategy != "ddp" and t.gpus == 1:
            raise ValueError(f"training.strategy: {t.strategy} shards across processes; set training.gpus >= 2")
        if self.method == "qlora" and q.bits == 8 and t.strategy in ("fsdp", "zero3"):
            raise ValueError(f"quantization.bits: 8-bit cannot be sharded by {t.strategy}; use bits: 4 "
                             "(4-bit weights are stored in the compute dtype so they shard)")
        if self.template.name == "custom" and not self.template.custom_jinja:
            raise ValueError("template.custom_jinja: required when template.name is custom")
        return self


# ---------------------------------------------------------------- YAML in and out

def _format_errors(err: ValidationError, source: str = "") -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        lines.append(f"{path}: {msg}" if path else msg)
    head = f"invalid config{' in ' + source if source else ''}:"
    return head + "\n  " + "\n  ".join(lines)


def from_dict(data: dict, source: str = "") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config{' in ' + source if source else ''}: expected a mapping at the top level")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    for item in overrides or []:
        apply_override(data, item)
    return from_dict(data, str(path))


def apply_override(data: dict, item: str) -> None:
    """`--set training.learning_rate=1e-4`: the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def to_yaml(cfg: RunConfig, header: str = "") -> str:
    body = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    return header + body


def save(cfg: RunConfig, path: str | Path, header: str = "") -> None:
    Path(path).write_text(to_yaml(cfg, header), encoding="utf-8")


# ---------------------------------------------------------------- device-dependent defaults

def detect_device(requested: str = "auto") -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device: cuda requested but no CUDA GPU is visible")
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def liger_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("liger_kernel", "triton"))


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill every 'auto' with the concrete value for this machine; the result is what runs."""
    import torch

    cfg = cfg.model_copy(deep=True)
    t = cfg.training
    device = detect_device(t.device)
    t.device = device
    if cfg.model.dtype == "auto":
        if device == "cuda":
            cfg.model.dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            cfg.model.dtype = "float32"  # bf16 on CPU is far slower and less exact
    if device == "cpu" and cfg.model.dtype != "float32":
        raise ConfigError(f"model.dtype: {cfg.model.dtype} training on CPU is not supported; use float32 or auto")
    if t.gradient_checkpointing == "auto" and device == "cpu":
        t.gradient_checkpointing = False  # CUDA: decided by the training child once the data is known
    if t.exclusive == "auto":
        t.exclusive = device == "cuda"
    if cfg.template.padding_free == "auto":
        # off for remote code (its attention may ignore position_ids) and NEFTune (its noise is
        # scaled by the row's length, which a padding-free row multiplies)
        cfg.template.padding_free = not cfg.model.trust_remote_code and t.neftune_alpha is None
    if cfg.template.pad_to_multiple_of == "auto":
        cfg.template.pad_to_multiple_of = 64 if device == "cuda" else 1
    elif cfg.template.pad_to_multiple_of < 1:
        raise ConfigError(f"template.pad_to_multiple_of: {cfg.template.pad_to_multiple_of} must be 1 (no padding) or more")
    if t.kernels == "auto":
        t.kernels = "all" if device == "cuda" and liger_available() else "off"
    elif t.kernels != "off" and device != "cuda":
        raise ConfigError(f"training.kernels: {t.kernels} needs CUDA (liger-kernel is Triton); use off or auto")
    elif t.kernels != "off" and not liger_available():
        raise ConfigError(f"training.kernels: {t.kernels} needs liger-kernel: pip install 'lorastudio[gpu]' "
                          "(or kernels: auto)")
    sharded = t.gpus > 1 and t.strategy in ("fsdp", "zero3")
    if t.fused_lora == "auto":
        t.fused_lora = (device == "cuda" and cfg.method in ("lora", "qlora") and cfg.lora.dropout == 0
                        and not cfg.lora.use_dora and not sharded)
    dropout = cfg.method != "full" and cfg.lora.dropout > 0
    if t.tiled_mlp is True and dropout:
        raise ConfigError("training.tiled_mlp: needs lora.dropout 0 (the backward recomputes each tile, "
                          "which would draw new dropout masks)")
    if t.tiled_mlp is True and t.gpus > 1:
        raise ConfigError("training.tiled_mlp: one GPU only for now (its backward accumulates gradients "
                          "outside the gradient hooks that multi-GPU strategies rely on)")
    if t.tiled_mlp == "auto" and (device != "cuda" or t.gpus > 1 or dropout):
        t.tiled_mlp = False  # one CUDA GPU: decided by the training child once the data is known
    if t.cudnn_attention is True and device != "cuda":
        raise ConfigError("training.cudnn_attention: CUDA only (or cudnn_attention: auto)")
    if t.cudnn_attention == "auto" and device != "cuda":
        t.cudnn_attention = False  # CUDA: decided by the training child once the data is known
    if t.optimizer == "auto" and (device != "cuda" or sharded):
        # sharded runs: plain torch AdamW (state sharded with the params). One GPU: decided by the
        # training child with the memory plan (core.estimate.memory_plan): torch's fused AdamW,
        # one kernel for every LoRA tensor (bitsandbytes' paged AdamW steps tensor by tensor
        # through managed memory: 0.58 vs 0.38 s a step on an 8B QLoRA, H200, docs/BENCHMARKS.md),
        # or paged_adamw_8bit when memory is short.
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
    if t.gpus > 1 or t.strategy != "ddp":
        from . import distributed

        distributed.check(cfg)  # ConfigError naming the field: GPU count, strategy, DeepSpeed installed
    cfg.resolved = {"device": device, "torch": torch.__version__}
    return cfg


def preset_header(command: str) -> str:
    return f"# {command}\n"
