"""RunConfig: the one typed config for a training run, and its YAML form.

Every knob has a visible default and one line of advice. Errors name the field path
("training.learning_rate: must be > 0"). `resolve()` fills device-dependent values (dtype,
gradient checkpointing, optimizer) so the run directory's config.yaml holds every value used.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import safe_io
from .errors import ConfigError  # noqa: F401 - raised and caught as core.config.ConfigError


# Upper bounds where a typo would cost a machine (a plan of 3e13 steps, a million-rank LoRA): far
# above any real run, so they only ever catch mistakes. The total number of steps, which needs the
# data, is checked by the training child (MAX_TOTAL_STEPS).
MAX_TOTAL_STEPS = 10_000_000
MAX_TOKENS = 1_048_576  # a row: 1M tokens (the long-context runs reach 348k)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_NOT_LAYOUT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # \t \n \r allowed
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")  # q_proj, model.layers.0.mlp


def _one_line(value: str | None, what: str = "must be one line of text (no control characters)") -> str | None:
    if value is not None and _CONTROL.search(value):
        raise ValueError(what)
    return value


class _Section(BaseModel):
    # allow_inf_nan=False: inf/nan are never a setting (inf > 0 passes a `gt=0` bound)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(_Section):
    name_or_path: str = Field("builtin:tiny", min_length=1, max_length=4096)  # local folder, hub id, or builtin:tiny
    revision: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-/]{1,256}$")  # hub revision (branch, tag or commit)
    trust_remote_code: bool = False  # runs code shipped with the model: only for models you trust
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on capable GPUs, fp32 on CPU
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"
    # QLoRA: keep the input embedding table in CPU RAM (V x H x 2 bytes less GPU memory: 1 GiB on
    # an 8B model; lookups are cheap). auto: only when the run would not fit the GPU otherwise
    embeddings_on_cpu: Literal["auto", True, False] = "auto"
    # a finished LoRA/QLoRA run (its folder, or its adapter/ or a checkpoint-N/ in it) to start
    # from: its adapter is trained further, and preference stages take it as the reference
    adapter_from: str | None = Field(None, min_length=1, max_length=4096)

    @field_validator("name_or_path", "adapter_from")
    @classmethod
    def _line(cls, v):
        return _one_line(v)


class DataSource(_Section):
    path: str = Field(min_length=1, max_length=4096)  # json/jsonl/csv/parquet/txt file, or builtin:sample
    # preference and kto: the rows of preference stages (core/preference_data.py)
    format: Literal["auto", "openai", "sharegpt", "alpaca", "guanaco", "xtuner", "text", "preference",
                    "kto"] = "auto"
    columns: dict[str, str] | None = Field(None, max_length=32)  # column-mapping override, e.g. {instruction: question}
    placeholders: dict[str, str] | None = Field(None, max_length=64)  # fills {{name}}/{{author}} as in identity data
    ratio: float = Field(1.0, gt=0, le=1000)  # rows taken = ratio x usable rows (>1 repeats, <1 subsamples)

    @field_validator("path")
    @classmethod
    def _line(cls, v):
        return _one_line(v)

    @field_validator("columns", "placeholders")
    @classmethod
    def _names(cls, v):
        for key, value in (v or {}).items():
            if not IDENTIFIER.fullmatch(key) or len(key) > 64:
                raise ValueError(f"{key!r}: keys are names (letters, digits, _)")
            if len(value) > 10_000 or _CONTROL_NOT_LAYOUT.search(value):
                raise ValueError(f"{key}: at most 10,000 characters of text")
        return v


class DataSection(_Section):
    sources: list[DataSource] = Field(default_factory=lambda: [DataSource(path="builtin:sample")], min_length=1,
                                      max_length=64)
    eval_split: float = Field(0.0, ge=0, lt=0.5)  # fraction held out for eval loss (0 = none)
    seed: int = Field(0, ge=0, lt=2**32)  # shuffling and mixing


class TemplateSection(_Section):
    # auto = the tokenizer's own; or chatml, qwen, llama3, mistral, ... or custom
    name: str = Field("auto", pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    custom_jinja: str | None = Field(None, max_length=256 * 1024)  # with name: custom; rendered in a sandbox
    cutoff_len: int = Field(1024, gt=0, le=MAX_TOKENS)  # tokens per sample; longer samples are truncated and counted
    # which answers are trained: all of a conversation's assistant turns, or the last only (earlier ones as context)
    train_on: Literal["all", "last"] = "all"
    # reasoning (<think>, reasoning_content) in earlier answers: auto = as the template renders it (a template that
    # strips it trains each answer in its own row, with its reasoning), keep = kept in one row, strip = removed
    reasoning: Literal["auto", "keep", "strip"] = "auto"
    # a system message with a template that has no system role (Gemma, Mistral): auto/fold = written into the first
    # user turn (counted in train.log), refuse = such rows are skipped with their reason
    system: Literal["auto", "fold", "refuse"] = "auto"
    packing: bool = False  # pack samples into cutoff_len rows (no cross-sample attention)
    # one row per micro-batch: samples concatenated with restarting position_ids, no pad tokens
    # (same samples per step, same loss, no cross-sample attention); auto: on unless the model
    # runs remote code (its attention may ignore position_ids) or NEFTune is on
    padding_free: Literal["auto", True, False] = "auto"
    # rows padded up to a multiple of this (pad after every real token, label -100): a CUDA step
    # on a few aligned lengths beats one on varying odd ones; auto: 64 on CUDA, 1 (none) on CPU
    pad_to_multiple_of: Literal["auto"] | Annotated[int, Field(ge=1, le=4096)] = "auto"


class LoraSection(_Section):
    r: int = Field(16, gt=0, le=4096)  # rank: 8-64 typical; higher = more capacity, more memory
    alpha: float = Field(32, gt=0, le=100_000)  # scale = alpha / r (or alpha / sqrt(r) with rslora)
    dropout: float = Field(0.0, ge=0, lt=1)  # 0 skips a copy of every LoRA input (faster); 0.05-0.1 on tiny datasets
    target_modules: list[str] | Literal["all-linear"] = "all-linear"  # all-linear, or e.g. [q_proj, v_proj]
    use_dora: bool = False  # weight-decomposed LoRA: a bit better, slower
    use_rslora: bool = False  # rank-stabilised scaling, helps at high r

    @field_validator("target_modules", mode="before")
    @classmethod
    def _modules(cls, v):
        if isinstance(v, str) and v != "all-linear":
            raise ValueError(f"{v!r}: all-linear, or a list of module names such as [q_proj, v_proj]")
        if isinstance(v, list):
            if not 1 <= len(v) <= 256:
                raise ValueError("give 1 to 256 module names, or all-linear")
            bad = [m for m in v if not isinstance(m, str) or len(m) > 200 or not IDENTIFIER.fullmatch(m)]
            if bad:
                raise ValueError(f"{bad[0]!r} is not a module name (letters, digits, _ and dots, e.g. q_proj)")
        return v


class QuantSection(_Section):
    bits: Literal[4, 8] | None = None  # only with method: qlora (defaults to 4)
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True  # quantise the quantisation constants: ~0.4 bit/param saved
    # stock PEFT (prepare_model_for_kbit_training) upcasts norms, embeddings and lm_head to fp32:
    # +2 GiB on an 8B model and fp32 logits, for no measured gain; on only to reproduce it
    fp32_upcast: bool = False


class TrainingSection(_Section):
    epochs: float = Field(3.0, gt=0, le=1000)
    max_steps: int = Field(-1, ge=-1, le=MAX_TOTAL_STEPS)  # > 0 overrides epochs
    micro_batch_size: int = Field(4, gt=0, le=4096)  # per device; lower it first when out of memory
    grad_accum: int = Field(4, gt=0, le=4096)  # effective batch = micro_batch_size x grad_accum
    learning_rate: float = Field(2e-4, gt=0, le=1)  # LoRA: 1e-4..5e-4; full fine-tuning: 1e-5..5e-5
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=10)
    max_grad_norm: float = Field(1.0, gt=0, le=1e6)
    # auto: adamw_torch_fused on one GPU (adamw_bnb_8bit, 8-bit state, when the run would not fit otherwise), else adamw_torch
    optimizer: str = Field("auto", pattern=r"^[a-z0-9_]{1,64}$")
    neftune_alpha: float | None = Field(None, gt=0, le=1000)  # noisy embeddings (5 is common); None = off
    # recompute activations in backward: less memory, slower steps. auto: off on CPU (12x slower
    # there); on CUDA off when the dataset's largest micro-batch fits the card without it
    gradient_checkpointing: Literal["auto", True, False] = "auto"
    # with checkpointing on: how many decoder layers recompute (the first N; the others keep
    # their activations, no recompute). all: every layer. auto: all, except on one CUDA GPU,
    # where the memory plan picks the fewest that fit the budget (each one costs ~1/3 of its forward again)
    checkpoint_layers: Annotated[int, Field(ge=1, le=100_000, strict=True)] | Literal["auto", "all"] = "auto"
    # with checkpoint_layers planned (auto): each micro-batch checkpoints the fewest layers its
    # own length needs, at most the plan's count for the longest (short batches skip recompute)
    checkpoint_per_batch: Literal["auto", True, False] = "auto"
    # with checkpointing: torch's reentrant checkpoint, whose first forward builds no autograd
    # graph (a QLoRA step is CPU-bound: 1.25x the non-reentrant step, 8B, H200). auto: on for one
    # GPU and for offloaded activations; off for several (DDP/FSDP/ZeRO-3 want the non-reentrant one)
    checkpoint_reentrant: Literal["auto", True, False] = "auto"
    # decoder layers (the last N not checkpointed) whose gated MLP keeps only its input for
    # backward and recomputes gate and up there, inside one autograd node (core/fused_lora.py
    # LoRAMLP): ~56% of a plain layer's activations (8B) for a second gate/up matmul on the GPU and
    # no second forward's Python. 0: off; all: every layer not checkpointed. auto: on one CUDA GPU
    # with fused LoRA, the memory plan's fewest, before any layer is checkpointed (by batch with
    # checkpoint_per_batch)
    mlp_recompute: Annotated[int, Field(ge=0, le=100_000, strict=True)] | Literal["auto", "all"] = "auto"
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
    seed: int = Field(42, ge=0, lt=2**32)
    logging_steps: int = Field(1, gt=0, le=MAX_TOTAL_STEPS)
    eval_steps: int = Field(50, gt=0, le=MAX_TOTAL_STEPS)
    save_steps: int = Field(100, gt=0, le=MAX_TOTAL_STEPS)  # checkpoint every N optimizer steps
    save_total_limit: int = Field(2, gt=0, le=1000)  # keep the last K checkpoints
    # stop after N evals without a better eval loss; keeps the best
    early_stopping_patience: int | None = Field(None, gt=0, le=100_000)
    sample_every: int = Field(0, ge=0, le=MAX_TOTAL_STEPS)  # sample generations every N steps (0 = only at the end)
    sample_prompts: list[str] = Field(default_factory=list, max_length=64)  # XTuner's evaluation_inputs
    sample_max_new_tokens: int = Field(64, gt=0, le=32768)
    # step metrics to a tracker too (metrics.jsonl is always written), through the Trainer's own
    # integration: tensorboard (RUN_DIR/tensorboard/) and trackio ($LORASTUDIO_HOME/trackio/) work
    # offline; wandb, mlflow as installed and configured. pip install 'lorastudio[track]' (core/trackers.py)
    report_to: Literal["none", "tensorboard", "trackio", "wandb", "mlflow"] = "none"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # one training job per device (a file lock; others wait in a queue); false: run beside others
    exclusive: Literal["auto", True, False] = "auto"
    queue: bool = True  # device busy: wait in the queue (True) or refuse at once (False)
    # GPU memory this run may use, per GPU (a shared card, an 8 GB budget); None: the card's free
    # memory at start. The auto settings above pick speed when it fits and savings when not.
    gpu_memory_gib: float | None = Field(None, gt=0, le=100_000)
    # processes (one per GPU; on CPU: gloo processes, for tests); >1 starts `accelerate launch`.
    # At most the GPUs this machine has (core.machine.check_gpus, before anything starts)
    gpus: int = Field(1, gt=0, le=1024)
    strategy: Literal["ddp", "fsdp", "zero2", "zero3"] = "ddp"  # ddp: a full copy per GPU; fsdp/zero3 shard the model
    offload: bool = False  # fsdp/zero2/zero3: keep params/optimizer state in CPU RAM (slower, fits bigger models)

    @field_validator("sample_prompts")
    @classmethod
    def _prompts(cls, v):
        for p in v:
            if len(p) > 10_000 or _CONTROL_NOT_LAYOUT.search(p):
                raise ValueError("each prompt: at most 10,000 characters of text")
        return v


class PreferenceSection(_Section):
    """The knobs of the preference stages (stage: dpo, orpo, simpo, kto; core/stage.py)."""
    # how far the policy may move from the reference: 0.1 is usual (higher = stay closer). ORPO:
    # the weight of the odds-ratio term (0.1); SimPO: the reward scale (2-10)
    beta: float = Field(0.1, gt=0, le=1000)
    # dpo: sigmoid (the DPO paper), ipo, hinge, robust (with label_smoothing), ..., several summed
    # with + (sigmoid+sft adds the chosen answers' SFT loss, RPO: keeps them likely, a small model's
    # guard against unlearning both answers); kto: kto or apo_zero_unpaired; auto: sigmoid, kto,
    # simpo, orpo by stage
    loss_type: str = Field("auto", pattern=r"^[a-z_]{1,32}(\+[a-z_]{1,32}){0,3}$")
    # share of preference labels assumed flipped (noisy data): 0; 0.1 with loss_type robust
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    # dpo: no reference model (its log-probs taken as 0): less memory and compute, weaker anchor
    reference_free: bool = False
    # simpo: the target reward margin (0.5-1.5 in the paper; the paper's gamma/beta ratio ~0.5)
    simpo_gamma: float = Field(0.5, ge=0, le=100)
    # kto: weights of the good / bad rows' losses; keep desirable x good rows ~ undesirable x bad rows
    desirable_weight: float = Field(1.0, gt=0, le=100)
    undesirable_weight: float = Field(1.0, gt=0, le=100)


class OutputSection(_Section):
    run_name: str | None = Field(None, max_length=200)  # default: <model>-<method>-<timestamp>

    @field_validator("run_name")
    @classmethod
    def _line(cls, v):
        return _one_line(v)


class RunConfig(_Section):
    # sft: supervised fine-tuning (and continued pretraining on text); dpo, orpo, simpo: pairs of
    # a chosen and a rejected answer; kto: answers labelled good or bad (core/stage.py)
    stage: Literal["sft", "dpo", "orpo", "simpo", "kto"] = "sft"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    template: TemplateSection = Field(default_factory=TemplateSection)
    method: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraSection = Field(default_factory=LoraSection)
    quantization: QuantSection = Field(default_factory=QuantSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    output: OutputSection = Field(default_factory=OutputSection)
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
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
        if self.stage != "sft" or self.model.adapter_from:
            from . import stage

            stage.check(self)
        if self.template.name == "custom" and not self.template.custom_jinja:
            raise ValueError("template.custom_jinja: required when template.name is custom")
        return self


# ---------------------------------------------------------------- YAML in and out

_BRANCH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a field name; union branches read "literal['auto']", "list[str]"


def _format_errors(err: ValidationError, source: str = "") -> str:
    msgs: dict[str, list[str]] = {}  # path -> messages (a union field gets one per branch)
    got: dict[str, str] = {}
    for e in err.errors():
        loc = [p for p in e["loc"] if isinstance(p, int) or (_BRANCH.fullmatch(p) and p not in ("str", "int", "float",
                                                                                               "bool", "list", "dict"))]
        path = ".".join(str(p) for p in loc)
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        if msg not in msgs.setdefault(path, []):
            msgs[path].append(msg)
        if "input" in e and e["type"] not in ("missing", "extra_forbidden") and not isinstance(e["input"], dict):
            text = repr(e["input"])
            got[path] = text if len(text) <= 200 else text[:200] + "..."
    lines = [(f"{path}: " if path else "") + " or ".join(m) + (f" (got {got[path]})" if path in got else "")
             for path, m in msgs.items()]
    head = f"invalid config{' in ' + source if source else ''}:"
    return head + "\n  " + "\n  ".join(lines)


def from_dict(data: dict, source: str = "") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config{' in ' + source if source else ''}: expected a mapping at the top level")
    from . import tiny

    tiny.pin_legacy(data)  # a run's config.yaml from before builds were pinned: the build it trained on
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    try:
        data = safe_io.read_yaml(path) or {}
    except safe_io.FileProblem as e:
        raise ConfigError(f"config file not found: {path}" if "file not found" in str(e) else str(e)) from None
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
    if not all(IDENTIFIER.fullmatch(p) for p in parts):
        raise ConfigError(f"--set {key!r}: expected a key path such as training.learning_rate")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
    try:
        node[parts[-1]] = safe_io.load_yaml(raw, f"--set {key}")
    except safe_io.FileProblem as e:
        raise ConfigError(str(e)) from None


def to_yaml(cfg: RunConfig, header: str = "") -> str:
    body = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    # every header line a comment: a path or preset name with a newline in it stays inside one
    lines = [ln if ln.startswith("#") else f"# {ln}" for ln in header.splitlines() if ln.strip()]
    return "".join(f"{ln}\n" for ln in lines) + body


def save(cfg: RunConfig, path: str | Path, header: str = "") -> None:
    Path(path).write_text(to_yaml(cfg, header), encoding="utf-8")
