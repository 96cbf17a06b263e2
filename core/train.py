"""The training child: `python -m lorastudio.core.train RUN_DIR [--resume]`.

Reads RUN_DIR/config.yaml, writes run.json, metrics.jsonl and the adapter. The spine:

    load config -> tokenizer + template -> data -> labels (templates.encode_example)
    -> model (+ quantization, + LoRA) -> Trainer with our callbacks -> save adapter

Exit codes: 0 done, 1 failed, 2 config/input error, 3 stopped (SIGTERM: save at the next
step, then exit). The parent (CLI or UI) never reads our output through a pipe: stdout and
stderr go to RUN_DIR/train.log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

from . import config as config_lib
from . import distributed
from . import runs

_STOP = {"requested": False, "in_training": False, "writing": 0, "no_raise": False}


class StopRequested(BaseException):
    """SIGTERM before training: a BaseException, like KeyboardInterrupt, so that no library's
    `except Exception` (an import, a tokenizer load) turns a Stop into a failure."""


def _on_sigterm(signum, frame):
    _STOP["requested"] = True
    print(f"[lorastudio] received signal {signum}: stopping at the next step", flush=True)
    if not (_STOP["in_training"] or _STOP["writing"] or _STOP["no_raise"]):
        raise StopRequested()


class _Writing:
    """No StopRequested inside a run.json/metrics.jsonl write (it would leave run.json's lock
    held); raised right after instead."""

    def __enter__(self):
        _STOP["writing"] += 1

    def __exit__(self, *exc):
        _STOP["writing"] -= 1
        if _STOP["requested"] and exc[0] is None and not (_STOP["writing"] or _STOP["in_training"] or _STOP["no_raise"]):
            raise StopRequested()


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("lorastudio", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def log(msg: str, all_ranks: bool = False) -> None:
    if not (all_ranks or distributed.is_main()):
        return  # one train.log for N ranks: rank 0 speaks for the run
    rank = f" rank {distributed.rank()}" if distributed.is_distributed() and all_ranks else ""
    print(f"[lorastudio {time.strftime('%H:%M:%S')}{rank}] {msg}", flush=True)


def _write_json(run_dir, **updates) -> None:
    """run.json: written by rank 0 only (every process when not distributed)."""
    if distributed.is_main():
        with _Writing():
            runs.write_json(run_dir, **updates)


def _event(run_dir, event: str, **fields) -> None:
    """metrics.jsonl: rank 0 only, so each step is recorded once."""
    if distributed.is_main():
        with _Writing():
            runs.append_event(run_dir, event, **fields)


# ---------------------------------------------------------------- Trainer callbacks

def make_callbacks(run_dir: Path, cfg, tokenizer, template, model_for_samples):
    from transformers import TrainerCallback

    t = cfg.training

    class Metrics(TrainerCallback):
        """Writes start/step/eval/checkpoint events; honours Stop at step boundaries."""

        def __init__(self):
            self.t0 = self.t_last = time.time()
            self.tokens_last = 0

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = self.t_last = time.time()
            self.tokens_last = state.num_input_tokens_seen
            self.step0 = state.global_step
            _event(run_dir, "start", total_steps=state.max_steps, step=state.global_step,
                              epochs=args.num_train_epochs)
            log(f"training: {state.max_steps} steps (from step {state.global_step})")

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            now = time.time()
            if "loss" in logs:
                dt = max(now - self.t_last, 1e-6)
                tok = state.num_input_tokens_seen - self.tokens_last
                done = state.global_step - self.step0
                eta = (now - self.t0) / done * (state.max_steps - state.global_step) if done else None
                rec = dict(step=state.global_step, loss=logs["loss"], lr=logs.get("learning_rate"),
                           grad_norm=logs.get("grad_norm"), epoch=round(state.epoch or 0, 4),
                           tokens_per_s=round(tok / dt, 1), tokens_seen=state.num_input_tokens_seen,
                           mem_mb=_memory_mb(), elapsed_s=round(now - self.t0, 2),
                           eta_s=round(eta, 1) if eta is not None else None, total_steps=state.max_steps)
                _event(run_dir, "step", **rec)
                if done == 3 and eta is not None and eta > DAY_S:  # measured, so said once it is known
                    warning = (f"at this speed the run needs ~{eta / DAY_S:.1f} more days "
                               f"({state.max_steps:,} steps); lower training.epochs or training.max_steps")
                    _write_json(run_dir, warnings=[warning])
                    _event(run_dir, "warning", message=warning)
                    log(f"WARNING: {warning}")
                log(f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                    f"lr {logs.get('learning_rate', 0):.2e} {rec['tokens_per_s']} tok/s")
                self.t_last, self.tokens_last = now, state.num_input_tokens_seen
            if "eval_loss" in logs:
                _event(run_dir, "eval", step=state.global_step, eval_loss=logs["eval_loss"])
                log(f"eval at step {state.global_step}: loss {logs['eval_loss']:.4f}")

        def on_save(self, args, state, control, **kw):
            path = run_dir / f"checkpoint-{state.global_step}"
            _event(run_dir, "checkpoint", step=state.global_step, path=str(path))

        def on_step_end(self, args, state, control, **kw):
            if t.sample_every and t.sample_prompts and state.global_step % t.sample_every == 0:
                write_samples(run_dir, cfg, model_for_samples, tokenizer, template, state.global_step,
                              wrapped=kw.get("model"))
            if distributed.is_distributed():
                # Stop is agreed by all ranks at this step boundary (all-reduce of the flag), so
                # every rank saves the same checkpoint and leaves the loop on the same step
                _STOP["requested"] = distributed.any_rank(_STOP["requested"])
            if _STOP["requested"]:
                control.should_save = True  # a checkpoint to resume from
                control.should_training_stop = True
            return control

    return [Metrics()]


def _memory_mb() -> float:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


def write_samples(run_dir, cfg, model, tokenizer, template, step, wrapped=None):
    """Sample replies. Sharded weights (FSDP, ZeRO-3): every rank generates inside a full-params
    gather; otherwise only rank 0 generates. Rank 0 writes the events."""
    from .generate import generate_reply

    if distributed.is_distributed() and not distributed.sharded(cfg) and not distributed.is_main():
        return
    with distributed.full_params(wrapped) if distributed.sharded(cfg) else _nullctx(), _autocast(cfg):
        for prompt in cfg.training.sample_prompts:
            reply = generate_reply(model, tokenizer, template, [{"role": "user", "content": prompt}],
                                   max_new_tokens=cfg.training.sample_max_new_tokens)
            _event(run_dir, "sample", step=step, prompt=prompt, reply=reply)
            log(f"sample @ {step}: {prompt!r} -> {reply!r}")


def _nullctx():
    import contextlib

    return contextlib.nullcontext()


def _autocast(cfg):
    """The Trainer's own autocast for generation mid-training: the LoRA layers expect it (16-bit
    input, fp32 adapter weights, core.model.load_for_training)."""
    if cfg.training.device != "cuda" or cfg.model.dtype == "float32":
        return _nullctx()
    import torch

    from .model import torch_dtype

    return torch.autocast("cuda", dtype=torch_dtype(cfg.model.dtype))


# ---------------------------------------------------------------- the spine

def load_tokenizer_and_template(cfg):
    """The tokenizer plus the template training (and later chat) uses; adds template tokens
    the tokenizer lacks and returns their new ids (their embedding rows get trained)."""
    from . import model as model_lib
    from . import templates

    tokenizer = model_lib.load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    template = templates.resolve_template(tokenizer, cfg.template.name, cfg.template.custom_jinja)
    missing = templates.missing_special_tokens(tokenizer, template)
    new_ids: list[int] = []
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
        new_ids = tokenizer.convert_tokens_to_ids(missing)
    return tokenizer, template, missing, new_ids


def prepare_data(cfg, tokenizer, template):
    """Files -> normalised messages -> input_ids + labels (templates.encode_example) -> split/pack."""
    from . import data as data_lib
    from . import dataset as dataset_lib
    from . import tiny

    sources = [s.model_dump() for s in cfg.data.sources]
    for s in sources:
        s["path"] = tiny.resolve_data(s["path"])
    ds, reports = data_lib.load_mixture(sources, seed=cfg.data.seed)
    _check_steps(cfg, round(len(ds) * (1 - cfg.data.eval_split)))  # before tokenising a typo's worth of rows
    tokenized, stats = dataset_lib.tokenize(ds, tokenizer, template, cfg.template.cutoff_len)
    if stats.kept == 0:
        raise data_lib.DataError("no sample has a trained token after truncation: raise template.cutoff_len "
                                 f"(now {cfg.template.cutoff_len})")
    eval_ds = None
    if cfg.data.eval_split > 0 and len(tokenized) >= 10:
        split = tokenized.train_test_split(test_size=cfg.data.eval_split, seed=cfg.data.seed)
        tokenized, eval_ds = split["train"], split["test"]
    if cfg.template.packing:
        tokenized = dataset_lib.pack(tokenized, cfg.template.cutoff_len)
    return tokenized, eval_ds, stats, reports, data_lib.dataset_hash(sources)


def memory_plan(cfg, lengths: list[int]) -> tuple[dict, list[str]]:
    """Fill the auto memory settings of a CUDA run in place (core.resolve.plan, stage 3) and cap
    torch's allocator at training.gpu_memory_gib when set. The worst micro-batch in tokens:
    packed rows are full; padding-free rows hold the mb longest samples; padded rows are mb x
    the longest. Returns (the decided fields, reasons)."""
    import torch

    from . import arch as arch_lib
    from . import resolve

    t = cfg.training
    mb = t.micro_batch_size
    longest = sorted(lengths, reverse=True)
    pad = _pad_multiple(cfg)
    up = lambda n: -(-n // pad) * pad  # noqa: E731 - rows are padded up to a multiple of pad
    if cfg.template.packing:
        max_tokens = up(cfg.template.cutoff_len * mb)
    elif cfg.template.padding_free:
        max_tokens = up(sum(longest[:mb]))
    else:
        max_tokens = up(longest[0] if longest else cfg.template.cutoff_len) * mb
    free, total = torch.cuda.mem_get_info()
    budget = free / 2 ** 30
    reasons = []
    if t.gpu_memory_gib:
        budget = min(budget, t.gpu_memory_gib)
        # the allocator's cap (the CUDA context and managed memory come on top: the plan counts them)
        torch.cuda.set_per_process_memory_fraction(min(1.0, t.gpu_memory_gib * 2 ** 30 / total))
        reasons.append(f"budget {t.gpu_memory_gib:g} GiB (training.gpu_memory_gib)")
    # multi-GPU: every rank must make the same choice (an optimizer per rank that differs would
    # split the replicas) and free memory differs by rank: the safe static settings, those the
    # plan gives an unknown architecture
    arch = None
    if t.gpus == 1:
        try:
            arch = arch_lib.arch_for(cfg.model.name_or_path)
        except Exception:  # noqa: BLE001 - an unknown architecture keeps the safe settings
            pass
    decided, why = resolve.plan(cfg, arch, max_tokens, budget)
    resolve.fill(cfg, decided)
    if t.gpus > 1:
        why = ["multi-GPU: checkpointing on, fused AdamW, embeddings and activations on the GPU unless set"]
    return decided, reasons + why


def _trainer_class(offload_activations: bool):
    from transformers import Trainer

    class LeanTrainer(Trainer):
        """The stock Trainer minus its per-step bookkeeping that costs more than it says. A LoRA
        step on an 8B model is CPU-bound (docs/BENCHMARKS.md), and every step the stock loop walks
        all ~2,700 modules three or four times (model.train(), num_parameters() for the FLOPs
        count, model.zero_grad(), clip over model.parameters()) and syncs with the GPU to count
        tokens. Same numbers, same order of operations; one process only for the cached
        parameter list (FSDP and DeepSpeed replace parameters when they wrap the model)."""

        _n_params = None  # for floating_point_ops: constant during training
        _trainable = None  # trainable parameters, cached at the first step; False: not used

        def _lean_params(self, model):
            if self._trainable is None:
                single = self.args.world_size == 1 and not self.is_deepspeed_enabled and not self.is_fsdp_enabled
                self._trainable = [p for p in model.parameters() if p.requires_grad] if single else False
                if self._trainable:  # Trainer calls model.zero_grad() after each optimizer step
                    params = self._trainable

                    def zero_grad(set_to_none: bool = True):
                        for p in params:
                            if set_to_none:
                                p.grad = None
                            elif p.grad is not None:
                                p.grad.zero_()

                    model.__dict__["zero_grad"] = zero_grad
            return self._trainable

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self._trainable is None or not model.training:
                # the full walk: at the first step (from_pretrained leaves the base model in eval
                # mode under a PeftModel in train mode) and after a switch to eval (eval, samples)
                model.train()
            self._lean_params(model)
            model.__dict__["train"] = lambda mode=True: model  # the stock step's own model.train()
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                del model.__dict__["train"]

        def floating_point_ops(self, inputs):
            main = getattr(self.model, "main_input_name", "input_ids")
            if self._n_params is None:
                self._n_params = super().floating_point_ops({main: _OneToken()})
            return self._n_params * inputs[main].numel() if main in inputs else 0

        def _clip_grad_norm(self, model):
            if self._trainable:
                return self.accelerator.clip_grad_norm_(self._trainable, self.args.max_grad_norm)
            return super()._clip_grad_norm(model)

        _num_pad = 0  # pad tokens of the batch in hand (core.dataset.collator, padding-free rows)

        def _prepare_inputs(self, inputs):
            # the collator's pad count is for the token count, not the model (popped from the
            # loop's own dict: the count is read before or after the step, by version)
            if isinstance(inputs, dict) and "num_pad_tokens" in inputs:
                self._num_pad = inputs.pop("num_pad_tokens")
            return super()._prepare_inputs(inputs)

        def _track_num_input_tokens(self, inputs):
            # padding-free rows: real tokens = the row's length less the collator's tail padding,
            # read from the shape (no GPU sync)
            main = getattr(self.model, "main_input_name", "input_ids")
            if self.args.include_num_input_tokens_seen == "all" and main in inputs:
                n = inputs[main].numel() - inputs.get("num_pad_tokens", self._num_pad)
                if self.args.world_size > 1:
                    import torch

                    n = self.accelerator.gather(torch.tensor(n, device=self.args.device)).sum().item()
                self.state.num_input_tokens_seen += n
            else:
                super()._track_num_input_tokens(inputs)

    if not offload_activations:
        return LeanTrainer

    class OffloadingTrainer(LeanTrainer):
        """training.offload_activations: tensors saved for backward during the forward (with
        reentrant checkpointing: each layer's input) live in CPU RAM until backward."""

        def compute_loss(self, model, inputs, *args, **kwargs):
            if not model.training:
                return super().compute_loss(model, inputs, *args, **kwargs)
            with offload_saved_tensors():
                return super().compute_loss(model, inputs, *args, **kwargs)

    return OffloadingTrainer


def offload_saved_tensors():
    """torch.autograd.graph.save_on_cpu, with two differences that matter for long rows.
    torch's pinned allocator rounds every block up to a power of two, so a 2.66 GiB layer input
    (348k tokens of an 8B model) pinned 4 GiB and 32 layers asked a 125 GiB host for 128 GiB: the
    OOM killer ended the run (docs/BENCHMARKS.md). Tensors of memory.PINNED_MAX bytes or more are
    copied to plain RAM at their exact size (a synchronous copy, small beside a layer's compute at
    such lengths); smaller ones to pinned RAM. Parameters saved for
    backward (lm_head's weight under the fused loss) stay where they are: they live on the GPU
    anyway. core.memory.offloaded_gib counts the same way."""
    import torch

    from . import memory

    pin = torch.cuda.is_available()

    def pack(t):
        if isinstance(t, torch.nn.Parameter) or t.is_sparse:
            return t
        pinned = pin and t.numel() * t.element_size() < memory.PINNED_MAX
        cpu = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pinned)
        cpu.copy_(t)
        return t.device, cpu, pinned

    def unpack(packed):
        if not isinstance(packed, tuple):
            return packed
        device, cpu, pinned = packed
        return cpu.to(device, non_blocking=pinned)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _pad_multiple(cfg) -> int:
    pad = cfg.template.pad_to_multiple_of
    return pad if isinstance(pad, int) else 1  # "auto" unresolved (a caller of build_trainer alone): none


class _OneToken:
    """An input of one token: the stock floating_point_ops gives 6 x parameters for it."""

    def numel(self) -> int:
        return 1


def _liger_config(kernels: str) -> dict | None:
    """liger-kernel patches for training.kernels (the Trainer applies them to the base model
    under the LoRA wrapper). The fused linear + cross-entropy never builds full-vocab logits."""
    if kernels not in ("loss", "all"):
        return None
    every = kernels == "all"
    return {"fused_linear_cross_entropy": True, "cross_entropy": False, "rope": every, "rms_norm": every,
            "swiglu": every}


def build_trainer(cfg, run_dir: Path, model, tokenizer, template, train_ds, eval_ds, callbacks=None):
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from . import dataset as dataset_lib
    from . import resolve

    # the memory settings the plan did not decide (a caller of build_trainer alone): as before data
    cfg = resolve.fill(cfg.model_copy(deep=True), resolve.unplanned(cfg))
    t = cfg.training
    on_cuda = t.device == "cuda"
    padding_free = bool(cfg.template.packing or cfg.template.padding_free)
    if on_cuda:
        import torch

        # cuDNN attention (SDPA's first choice on Hopper) builds an execution plan for every new
        # sequence length, and padded or padding-free batches change length every step (the CPU
        # time of a step, docs/BENCHMARKS.md). Flash / memory-efficient attention need no plan.
        # On long rows attention's GPU time dominates and cuDNN's faster kernel wins
        # (training.cudnn_attention, decided by the memory plan; off when it did not run).
        torch.backends.cuda.enable_cudnn_sdp(t.cudnn_attention is True)
    args = TrainingArguments(
        output_dir=str(run_dir), report_to="none", disable_tqdm=True,
        num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.micro_batch_size, per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, neftune_noise_alpha=t.neftune_alpha,
        optim=t.optimizer,
        gradient_checkpointing=False,  # already enabled on the model (core.model.load_for_training)
        bf16=on_cuda and cfg.model.dtype == "bfloat16", fp16=on_cuda and cfg.model.dtype == "float16",
        use_cpu=not on_cuda, seed=t.seed, data_seed=t.seed,
        logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=t.eval_steps, remove_unused_columns=False, dataloader_num_workers=0,
        # padding-free rows hold no pad token (and pad may == eos, which a by-id count would skip)
        include_num_input_tokens_seen="all" if padding_free else "non_padding",
        use_liger_kernel=t.kernels in ("loss", "all"), liger_kernel_config=_liger_config(t.kernels),
        # batches are pinned: their copy to the GPU need not wait for the previous step to finish
        accelerator_config={"non_blocking": on_cuda},
        # LoRA uses every trainable parameter each step: no DDP search for unused ones
        ddp_find_unused_parameters=False if distributed.is_distributed() else None,
        # early stopping keeps the best checkpoint by eval loss and ends with it loaded
        load_best_model_at_end=t.early_stopping_patience is not None,
        metric_for_best_model="eval_loss" if t.early_stopping_patience is not None else None,
        greater_is_better=False if t.early_stopping_patience is not None else None,
    )
    trainer = _trainer_class(t.offload_activations is True)(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=dataset_lib.collator(tokenizer, padding_free, _pad_multiple(cfg)), processing_class=tokenizer,
        callbacks=callbacks or [],
    )
    trainer.remove_callback(PrinterCallback)  # our Metrics callback logs one line per step instead
    if t.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    return trainer


def _check_steps(cfg, rows: int) -> int:
    """The optimizer steps the run plans (training.max_steps, else epochs x rows / effective batch);
    a ConfigError past core.config.MAX_TOTAL_STEPS (a typo of 1e12 epochs, not a run)."""
    t = cfg.training
    batches = -(-rows // (t.micro_batch_size * distributed.world_size()))  # ceil: micro-batches per epoch
    per_epoch = max(1, -(-batches // t.grad_accum))
    steps = t.max_steps if t.max_steps > 0 else math.ceil(per_epoch * t.epochs)
    if steps > config_lib.MAX_TOTAL_STEPS:
        raise config_lib.ConfigError(
            f"training.epochs: {t.epochs:g} epochs of {rows:,} rows make {steps:,} steps; at most "
            f"{config_lib.MAX_TOTAL_STEPS:,} (lower training.epochs, or set training.max_steps)")
    return steps


DAY_S = 24 * 3600


def train(cfg, run_dir: Path, resume: bool) -> int:
    from transformers import set_seed

    from . import model as model_lib
    from . import templates

    t = cfg.training
    set_seed(t.seed)
    if distributed.is_distributed() and t.device == "cuda":
        import torch

        torch.cuda.set_device(distributed.local_rank())  # each rank loads onto its own card

    # 1. tokenizer and template (the same template chat will use)
    tokenizer, template, missing, new_ids = load_tokenizer_and_template(cfg)
    if missing:
        log(f"added template tokens {missing} as ids {new_ids}; their embedding rows are trained")
    warnings = templates.template_warnings(tokenizer, template)
    for w in warnings:
        log(f"template warning: {w}")

    # 2. data -> labels
    train_ds, eval_ds, stats, reports, data_hash = prepare_data(cfg, tokenizer, template)
    summary = stats.summary()
    for r in reports:
        log(f"data: {r.summary()}")
    log(f"tokens: {summary}" + (f"; packed into {len(train_ds)} rows" if cfg.template.packing else ""))
    _write_json(run_dir, dataset_hash=data_hash, template=template.name, template_warnings=warnings,
                    added_tokens=missing,
                    data={"reports": [{"path": r.path, "format": r.format, "rows_used": r.rows_used,
                                       "rows_skipped": r.rows_skipped, "summary": r.summary(),
                                       "skipped": [s.reason for s in r.skipped[:20]]} for r in reports],
                          "tokens": summary})
    _event(run_dir, "data", **summary)

    if t.device == "cuda":  # the auto memory settings, now that the longest micro-batch is known
        decided, reasons = memory_plan(cfg, stats.lengths)
        for r in reasons:
            log(f"memory plan: {r}")
        if decided and distributed.is_main():
            config_lib.save(cfg, run_dir / "config.yaml", header=_config_header(run_dir))  # the values that ran

    # 3. model (+ 4/8-bit base, + LoRA or full)
    model = model_lib.load_for_training(cfg, tokenizer, new_ids)
    trainable, total = model_lib.count_parameters(model)
    log(f"model: {trainable:,} trainable of {total:,} parameters ({cfg.method}, {cfg.model.dtype}, {t.device})")
    # bitsandbytes' own layers only (PEFT's LoRA wrappers reuse the class names)
    quantized = sum(type(m).__module__.startswith("bitsandbytes") and type(m).__name__ in ("Linear4bit", "Linear8bitLt")
                    for m in model.modules())
    _write_json(run_dir, params={"trainable": trainable, "total": total, "quantized_linear": quantized})
    if t.kernels != "off" and missing and not model.config.get_text_config().tie_word_embeddings:
        # the fused loss reads lm_head.weight directly and would miss the trained rows of added tokens
        log("kernels: fused loss off (added tokens train rows of an untied lm_head)")
        cfg.training.kernels = "off"
    padding_free, pad = bool(cfg.template.padding_free or cfg.template.packing), _pad_multiple(cfg)
    _write_json(run_dir, speed_path={
        "padding_free": padding_free, "packing": cfg.template.packing, "pad_to_multiple_of": pad,
        "kernels": t.kernels, "gradient_checkpointing": t.gradient_checkpointing, "optimizer": t.optimizer,
        "offload_activations": t.offload_activations, "embeddings_on_cpu": cfg.model.embeddings_on_cpu,
        "fused_lora": t.fused_lora, "tiled_mlp": t.tiled_mlp, "cudnn_attention": t.cudnn_attention,
        "fp32_upcast": cfg.quantization.fp32_upcast if cfg.method == "qlora" else None,
        "lora_dropout": cfg.lora.dropout if cfg.method != "full" else None})
    log(f"speed path: padding-free {padding_free}, packing {cfg.template.packing}, "
        f"rows padded to a multiple of {pad}, kernels {t.kernels}, fused lora {t.fused_lora}, tiled MLP {t.tiled_mlp}, "
        f"cuDNN attention {t.cudnn_attention}, "
        f"gradient checkpointing {t.gradient_checkpointing}, "
        f"fp32 upcast {cfg.quantization.fp32_upcast if cfg.method == 'qlora' else 'n/a'}, lora dropout {cfg.lora.dropout}, "
        f"optimizer {t.optimizer}, offload activations {t.offload_activations}, "
        f"embeddings on cpu {cfg.model.embeddings_on_cpu}")

    # 4. train
    trainer = build_trainer(cfg, run_dir, model, tokenizer, template, train_ds, eval_ds,
                            callbacks=make_callbacks(run_dir, cfg, tokenizer, template, model))
    ckpt = runs.last_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        log("resume: no checkpoint found, starting from step 0")
    if ckpt:
        _event(run_dir, "resume", checkpoint=str(ckpt), step=int(ckpt.name.split("-")[-1]))
        log(f"resuming from {ckpt.name}")
    _write_json(run_dir, status="running")
    _STOP["in_training"] = _STOP["no_raise"] = True  # from here on Stop is honoured at step boundaries
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    dist = distributed.is_distributed()
    if not dist:  # ranks keep a late SIGTERM as a flag: the final save below is collective
        _STOP["in_training"] = False

    # 5. save: adapter (or full model) with tokenizer and the exact template used
    out_dir = run_dir / ("model" if cfg.method == "full" else "adapter")
    if dist:
        if trainer.is_fsdp_enabled:  # gather the sharded adapter in full for the rank-0 save
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(out_dir))  # collective; only rank 0 (args.should_save) writes
        if distributed.is_main():
            (out_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; the adapter needs none
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
    if distributed.is_main():
        tokenizer.chat_template = template.source
        tokenizer.save_pretrained(out_dir)
        (out_dir / "lorastudio.json").write_text(json.dumps({
            "base_model": cfg.model.name_or_path, "method": cfg.method, "template": template.name,
            "eot_token": template.eot_token, "stop_strings": template.stop_strings, "added_tokens": missing,
            "step": trainer.state.global_step, "gpus": t.gpus, "strategy": t.strategy}, indent=2))
    if t.sample_prompts:
        write_samples(run_dir, cfg, model, tokenizer, template, trainer.state.global_step,
                      wrapped=trainer.model_wrapped)
    stopped = distributed.any_rank(_STOP["requested"]) if dist else _STOP["requested"]
    _STOP["in_training"] = False
    st = trainer.state
    if st.best_model_checkpoint:
        _write_json(run_dir, best_checkpoint=Path(st.best_model_checkpoint).name, best_eval_loss=st.best_metric)
    if t.early_stopping_patience is not None and not stopped and st.global_step < st.max_steps:
        _event(run_dir, "early_stop", step=st.global_step, best_checkpoint=st.best_model_checkpoint,
                          best_eval_loss=st.best_metric)
        log(f"early stop at step {st.global_step}: no better eval loss in {t.early_stopping_patience} evals; "
            f"kept {Path(st.best_model_checkpoint).name} (eval loss {st.best_metric:.4f})")
    _event(run_dir, "stopped" if stopped else "end", step=trainer.state.global_step,
                      train_loss=result.training_loss, runtime_s=result.metrics.get("train_runtime"))
    return runs.EXIT_STOPPED if stopped else runs.EXIT_DONE


def _quiet_libraries() -> None:
    """Keep train.log readable: no progress bars, no library deprecation chatter."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernels it cannot find


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lorastudio.core.train")
    ap.add_argument("run_dir")
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)
    run_dir = Path(a.run_dir).resolve()
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigterm)
    dist = distributed.is_distributed()
    if dist:
        # a rank of `accelerate launch`: torchrun gave it its own session and forwards SIGTERM to it;
        # it dies with its launcher, and logs the environment it inherited (NCCL safety variables)
        distributed.die_with_parent()
        log(f"{distributed.env_line()} (pid {os.getpid()}, world size {distributed.world_size()})", all_ranks=True)
    else:
        try:
            os.setpgid(0, 0)  # own process group even when started without start_new_session
        except (PermissionError, OSError):
            pass
    import psutil

    from . import jobs, locks, machine

    writer = None
    if distributed.is_main():
        try:  # first of all: a second writer must not touch run.json (it would hide the real pid)
            writer = locks.writer_lock(run_dir)
        except locks.Busy as e:
            log(f"refused: {e}")
            return runs.EXIT_CONFIG
    if dist:  # run.json keeps the launcher's pid/pgid (runs.launch wrote them): Stop signals the launcher
        _write_json(run_dir, status="starting", rank0_pid=os.getpid(), world_size=distributed.world_size(),
                    started=time.time(), versions=versions(), host=platform.node(), exit_code=None, error=None)
    else:
        me = jobs.live(run_dir)
        if me is None or me.pid != os.getpid():
            # started by hand (not by runs.launch): record this process, so Stop may signal it
            os.environ.setdefault(jobs.TOKEN_ENV, jobs.new_token())
            jobs.register(run_dir, os.getpid(), os.environ[jobs.TOKEN_ENV])
        _write_json(run_dir, status="starting", pid=os.getpid(), pgid=os.getpgrp(),
                    pid_start_time=psutil.Process().create_time(), started=time.time(), versions=versions(),
                    host=platform.node(), exit_code=None, error=None)
    code, error = runs.EXIT_FAILED, None
    held: list = []
    bad_input: tuple = (config_lib.ConfigError, locks.Busy)
    try:
        if not distributed.is_main():
            distributed.wait_for_rank0(run_dir)  # rank 0 resolved the config and holds the cards
        cfg = config_lib.load(run_dir / "config.yaml")
        device = machine.device_for(cfg.training.device)
        problem = machine.gpus_problem(cfg.training.gpus, cfg.training.device)
        if problem:
            raise config_lib.ConfigError(problem)
        if device == "cpu":  # a runaway CPU run fails alone (CUDA maps more address space than RAM)
            limit = machine.limit_memory("cpu_job")
            if limit:
                log(f"memory limit: {limit / 2**30:.1f} GiB of address space ({machine.ENV['cpu_job']} changes it)")
        if distributed.is_main():
            held = [writer]  # held until exit: never two writers on one run dir
            if cfg.training.exclusive is not False:
                # the queue comes before torch is imported: ten waiting runs cost ten small processes
                held += _take_device(cfg, device, run_dir)
        _quiet_libraries()
        from . import data as data_lib
        from . import model as model_lib
        from . import templates

        bad_input = (config_lib.ConfigError, data_lib.DataError, templates.TemplateError, model_lib.ModelError,
                     locks.Busy)
        if os.environ.get("LORASTUDIO_FAULTS"):
            _install_faults(os.environ["LORASTUDIO_FAULTS"])
        from . import resolve

        cfg = resolve.resolve(cfg)
        if distributed.is_main():
            # runs started from the UI (which never imports torch) get their resolved values here
            config_lib.save(cfg, run_dir / "config.yaml", header=_config_header(run_dir))
            if dist:
                distributed.release_ranks(run_dir)
        _write_json(run_dir, model_revision=_model_revision(cfg))
        code = train(cfg, run_dir, a.resume)
        _STOP["no_raise"] = True  # the end is being written: a SIGTERM interrupts nothing
    except StopRequested:
        _STOP["no_raise"] = True
        code = runs.EXIT_STOPPED
        _event(run_dir, "stopped", step=0)
    except Exception as e:  # noqa: BLE001 - every failure must reach run.json with a message
        _STOP["no_raise"] = True
        traceback.print_exc()
        if isinstance(e, OSError):
            _discard_partial_checkpoints(run_dir)
        error = _explain(e, run_dir)
        if type(e).__name__ == "OutOfMemoryError" and "cfg" in locals():
            from .recovery import oom_retry_overrides

            _write_json(run_dir, retry=oom_retry_overrides(cfg))
        code = runs.EXIT_CONFIG if isinstance(e, bad_input) else runs.EXIT_FAILED
        _event(run_dir, "failed", error=error)
        log(f"FAILED: {error}")
    status = {runs.EXIT_DONE: "done", runs.EXIT_STOPPED: "stopped"}.get(code, "failed")
    _write_json(run_dir, status=status, exit_code=code, error=error, ended=time.time())
    log(f"exit {code} ({status})", all_ranks=dist)
    for lk in held[1:]:  # device locks (the OS would release them at exit anyway)
        lk.release()
    if dist and distributed.is_main():
        distributed.cleanup(run_dir)
    return code


def _config_header(run_dir: Path) -> str:
    lines = [ln for ln in (run_dir / "config.yaml").read_text().splitlines() if ln.startswith("#")]
    return "\n".join(lines or [f"# lorastudio train {run_dir / 'config.yaml'}"]) + "\n"


def _take_device(cfg, device: str, run_dir: Path) -> list:
    """Wait (visibly) for the device lock of every card the job uses (training.gpus of them, in
    index order; cpu.lock on CPU), or refuse at once when training.queue is false. Taken by rank 0
    only, before torch is imported."""
    t = cfg.training
    taken = []
    for lock in distributed.device_locks(device, t.gpus, "training", run_dir):
        def on_wait(position, holder, lock=lock):
            who = (holder or {}).get("run_dir") or (holder or {}).get("job", "another job")
            _write_json(run_dir, status="queued", queue_position=position, queue_device=lock.key, queue_holder=who)
            _event(run_dir, "queued", position=position, device=lock.key, holder=who)
            log(f"waiting for {lock.key}: position {position} in the queue (held by {who})")

        lock.acquire(wait=t.queue, on_wait=on_wait)
        taken.append(lock)
    _write_json(run_dir, status="starting", queue_position=None, devices=[lk.key for lk in taken])
    return taken


def _model_revision(cfg) -> str | None:
    from . import model as model_lib

    path = Path(model_lib.resolve_path(cfg.model.name_or_path))
    if cfg.model.revision:
        return cfg.model.revision
    if path.is_dir():  # a local folder has no commit: fingerprint its config instead
        import hashlib

        cfgf = path / "config.json"
        return "local:" + hashlib.sha256(cfgf.read_bytes()).hexdigest()[:12] if cfgf.exists() else "local"
    return None


_DISK_FULL = (28, 122, 27)  # ENOSPC, EDQUOT, EFBIG


def _explain(e: Exception, run_dir: Path) -> str:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, torch.OutOfMemoryError):
        return ("out of GPU memory: lower training.micro_batch_size (raise grad_accum to keep the effective "
                "batch) or template.cutoff_len, or use method: qlora. Retry with half the micro-batch and the "
                "same effective batch: lorastudio retry " + str(run_dir))
    if isinstance(e, MemoryError) or "can't allocate memory" in str(e):
        from . import machine

        limit = machine.memory_limit("cpu_job")
        return (f"out of host memory ({type(e).__name__}; this run may use {limit / 2**30:.1f} GiB, "
                f"{machine.ENV['cpu_job']} changes that): lower training.micro_batch_size or template.cutoff_len")
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        good = runs.last_checkpoint(run_dir)
        return (f"disk full while writing under {run_dir} ({e.strerror}); free some space, then "
                + (f"`lorastudio resume {run_dir}` continues from {good.name}, which is intact"
                   if good else "start again (no complete checkpoint yet)"))
    return f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)


def _discard_partial_checkpoints(run_dir: Path) -> None:
    """A save cut short leaves a checkpoint without trainer_state.json: remove it."""
    import shutil

    for cp in run_dir.glob("checkpoint-*"):
        if cp.is_dir() and not (cp / "trainer_state.json").exists():
            shutil.rmtree(cp, ignore_errors=True)
            log(f"removed incomplete {cp.name}")


def _install_faults(spec: str) -> None:
    """Fault injection for tests, e.g. LORASTUDIO_FAULTS="enospc_on_save=2,oom_at_step=3": drives the
    real error paths for a full disk (mid-checkpoint) and CUDA out-of-memory on any machine."""
    import errno

    import torch
    from transformers import Trainer

    faults = dict(item.split("=") for item in spec.split(",") if "=" in item)
    if "enospc_on_save" in faults:
        nth, calls = int(faults["enospc_on_save"]), {"n": 0}
        orig_rng = Trainer._save_rng_state

        def save_rng(self, output_dir):  # runs mid-checkpoint: weights+optimizer already written
            calls["n"] += 1
            if calls["n"] == nth:
                raise OSError(errno.ENOSPC, "No space left on device (simulated)", output_dir)
            return orig_rng(self, output_dir)

        Trainer._save_rng_state = save_rng
    if "oom_at_step" in faults:
        at, orig_step = int(faults["oom_at_step"]), Trainer.training_step

        def step(self, *args, **kwargs):
            if self.state.global_step + 1 >= at:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return orig_step(self, *args, **kwargs)

        Trainer.training_step = step


if __name__ == "__main__":
    sys.exit(main())
