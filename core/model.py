"""Loading tokenizers and models (local folder, hub id or the embedded tiny default),
quantization, and the LoRA wrapper. Used by training, merging and chat."""

from __future__ import annotations

import json
from pathlib import Path

from . import tiny
from .config import ConfigError, RunConfig


class ModelError(ValueError):
    """The model path is wrong, is not a model, or needs remote code that was not allowed."""


DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_path(name_or_path: str) -> str:
    try:
        return tiny.resolve_model(name_or_path)
    except ValueError as e:  # builtin:tiny@N of a build this version does not have
        raise ModelError(f"model.name_or_path: {e}") from None


def _check_local(path: str) -> None:
    p = Path(path)
    looks_local = p.is_absolute() or path.startswith((".", "~")) or p.exists()
    if looks_local and not p.exists():
        raise ModelError(f"model.name_or_path: folder not found: {path}")
    if p.is_dir() and not any((p / f).exists() for f in ("config.json", "tokenizer.json", "tokenizer_config.json",
                                                          "tokenizer.model", "vocab.json")):
        raise ModelError(f"model.name_or_path: {path} is not a model folder (no config.json or tokenizer files)")


def _needs_remote_code(path: str) -> bool:
    """An auto_map in config.json or tokenizer_config.json (InternLM2, ChatGLM3 tokenizers) means
    the folder's own Python code would run."""
    for name in ("config.json", "tokenizer_config.json"):
        cfg = Path(path) / name
        if cfg.exists():
            try:
                if "auto_map" in json.loads(cfg.read_text()):
                    return True
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
    return False


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_path(name_or_path)
    _check_local(path)
    if _needs_remote_code(path) and not trust_remote_code:
        raise ModelError(f"model.name_or_path: {name_or_path} ships its own tokenizer or model code (auto_map); "
                         "tick trust_remote_code (model.trust_remote_code: true) only if you trust its author")
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name_or_path: cannot load a tokenizer from {name_or_path}: {e}") from None
    if tok.pad_token is None:
        # Labels are masked by position, not by id, so pad == eos is safe here.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def load_for_training(cfg: RunConfig, tokenizer, new_token_ids: list[int] | None = None):
    """Base model (optionally 4/8-bit), resized for added tokens, wrapped with LoRA unless full."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = resolve_path(cfg.model.name_or_path)
    _check_local(path)
    if _needs_remote_code(path) and not cfg.model.trust_remote_code:
        raise ModelError(f"model.name_or_path: {cfg.model.name_or_path} needs trust_remote_code")
    dtype = torch_dtype(cfg.model.dtype)
    device = cfg.training.device
    kwargs: dict = dict(dtype=dtype, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
                        attn_implementation=cfg.model.attn_implementation)
    if cfg.method == "qlora":
        q = cfg.quantization
        if q.bits == 4:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
                bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        # this process's card (a rank of a multi-GPU run has set its own; else 0)
        # this process's own card: a rank of a multi-GPU run is LOCAL_RANK (set before anything
        # touches CUDA, or rank 1 would quantise onto cuda:0 and keep its quant state there)
        kwargs["device_map"] = {"": _local_cuda()} if device == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelError(f"model.name_or_path: cannot load model weights from {cfg.model.name_or_path}: {e}") from None
    if device == "cuda" and cfg.method != "qlora":
        model = model.to(f"cuda:{_local_cuda()}")

    if new_token_ids:
        # Template tokens the tokenizer lacked: grow the embedding (mean-initialised by HF).
        model.resize_token_embeddings(len(tokenizer))
    model.config.use_cache = False  # the KV cache is useless (and wasteful) while training
    if cfg.model.embeddings_on_cpu is True and device == "cuda":
        import torch

        plain = type(model.get_input_embeddings()) is torch.nn.Embedding  # not e.g. Gemma's scaled one
        # trained rows of added tokens, a table shared with lm_head, a custom module: stay on the GPU
        if plain and not new_token_ids and not model.config.get_text_config().tie_word_embeddings:
            embeddings_on_cpu(model)

    gc = bool(cfg.training.gradient_checkpointing)
    # reentrant (training.checkpoint_reentrant): the first forward of a checkpointed layer runs
    # without autograd, and its input is kept with save_for_backward, which offloaded activations'
    # torch.autograd.graph.save_on_cpu (core.trainer) moves to CPU RAM
    gc_kwargs = {"use_reentrant": cfg.training.checkpoint_reentrant is True}
    if cfg.method == "full":
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        return _layer_options(cfg, model)

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    sharded = cfg.training.gpus > 1 and cfg.training.strategy in ("fsdp", "zero3")
    if cfg.method == "qlora" and cfg.quantization.fp32_upcast and not sharded:
        # stock PEFT: norms, embeddings and lm_head upcast to fp32 (FSDP/ZeRO-3 cannot take it:
        # they flatten each layer into one tensor of one dtype)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=gc_kwargs)
    elif cfg.method == "qlora":
        # everything that is not 4-bit stays in the compute dtype: under bf16 autocast the matmuls
        # run in bf16 either way, and the fp32 copies only cost memory and a cast per step
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    lc = cfg.lora
    trainable_tokens = None
    if new_token_ids:
        trainable_tokens = {_embedding_name(model): list(new_token_ids)}
        out = model.get_output_embeddings()
        if out is not None and not model.config.get_text_config().tie_word_embeddings:
            trainable_tokens[_output_name(model)] = list(new_token_ids)
    peft_cfg = LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
        use_dora=lc.use_dora, use_rslora=lc.use_rslora, task_type="CAUSAL_LM",
        trainable_token_indices=trainable_tokens,
    )
    import torch

    torch.manual_seed(cfg.training.seed)  # LoRA A init depends on the seed alone, not on what ran before
    try:
        model = get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules: {e}") from None
    if cfg.training.fused_lora is True:
        from . import fused_lora

        fused_lora.install(model)  # plain LoRA layers: one autograd node each (dropout > 0 falls back)
    if device == "cuda" and cfg.model.dtype != "float32" and not lc.use_dora:
        # Training (and the samples) run under autocast: PEFT's cast of every LoRA input to the
        # adapter's fp32 makes a copy of the activation that the matmul casts straight back
        # (bf16 -> fp32 -> bf16 is exact). Off: same numbers, one activation copy less per layer.
        for m in model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = False
    return _layer_options(cfg, model)


def _layer_options(cfg, model):
    """training.tiled_mlp (core/tiled_mlp.py): MLPs over tiles of long rows;
    training.checkpoint_layers: the decoder layers past the first N keep their activations; and
    training.mlp_recompute: the MLPs of the last N of those keep only their input
    (core.fused_lora.LoRAMLP; the trainer varies N by batch under checkpoint_per_batch)."""
    _checkpoint_first(cfg, model)
    if cfg.training.tiled_mlp is True:
        from . import memory, tiled_mlp

        tiled_mlp.install(model, memory.tiled_mlp_tile(model.config.get_text_config().hidden_size))
    if cfg.training.mlp_recompute not in ("auto", 0) and cfg.method != "full":
        from . import fused_lora, memory

        mlps = fused_lora.install_mlp(model)
        fused_lora.set_mlp_recompute(mlps, memory.mlp_layers(cfg, len(mlps)))
    return model


def _checkpoint_first(cfg, model) -> None:
    k = cfg.training.checkpoint_layers
    if not cfg.training.gradient_checkpointing or not isinstance(k, int):
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    # transformers checkpoints each GradientCheckpointingLayer whose flag is set (the decoder
    # layers, in order): clearing the flag runs that layer as without checkpointing
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for m in layers[k:]:
        m.gradient_checkpointing = False


def embeddings_on_cpu(model) -> None:
    """Move the (frozen) input embedding table to CPU RAM: the lookup runs on the CPU and the rows
    go to the GPU (a few MB a step). Frees V x H x 2 bytes of GPU memory."""
    import torch

    class CPUEmbedding(torch.nn.Module):
        """A frozen embedding whose table lives in CPU RAM. The table is not a registered
        parameter, so `model.device` (the first parameter's device, which generation and the
        samples use for their inputs) stays the GPU. The trainer hands over the batch's ids while
        they are still on the CPU (`ids_from`): copying them back from the GPU would wait for the
        GPU to drain its queue, every step, and a LoRA step is CPU-bound."""

        def __init__(self, emb, device):
            super().__init__()
            self._table = {"weight": emb.weight.detach().to("cpu")}
            self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
            self.padding_idx = emb.padding_idx
            self.out_device = device
            self._handed = None  # (ids on the device, the same ids on the CPU)
            self.synced = 0  # lookups not handed their ids (tests, the bench: 0 in a training step)

        @property
        def weight(self):  # shape/dtype for code that inspects the input embedding
            return self._table["weight"]

        def ids_from(self, on_device, on_cpu):
            self._handed = (on_device, on_cpu)

        def forward(self, input_ids):
            handed, self._handed = self._handed, None
            if handed is not None and handed[0] is input_ids:
                ids = handed[1]
            else:  # generation, samples, a model that rebuilt the ids: the copy waits for the GPU
                ids = input_ids.to("cpu")
                self.synced += 1
            rows = torch.nn.functional.embedding(ids, self._table["weight"], self.padding_idx)
            if torch.device(self.out_device).type == "cuda":
                rows = rows.pin_memory()  # a pinned source makes the copy asynchronous
            return rows.to(self.out_device, non_blocking=True)

    emb = model.get_input_embeddings()
    model.set_input_embeddings(CPUEmbedding(emb, emb.weight.device))


def _local_cuda() -> int:
    import os

    import torch

    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return index


def _embedding_name(model) -> str:
    emb = model.get_input_embeddings()
    return next(n.split(".")[-1] for n, m in model.named_modules() if m is emb)


def _output_name(model) -> str:
    out = model.get_output_embeddings()
    return next(n.split(".")[-1] for n, m in model.named_modules() if m is out)


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
