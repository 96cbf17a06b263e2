"""The training child: `python -m lorastudio.core.train RUN_DIR [--resume]`.

Reads RUN_DIR/config.yaml, writes run.json, metrics.jsonl and the adapter. The spine:

    load config -> tokenizer + template -> data -> labels (labels.encode_example)
    -> model (+ quantization, + LoRA) -> Trainer with our callbacks -> save adapter

Exit codes: 0 done, 1 failed, 2 config/input error, 3 stopped (SIGTERM: save at the next
step, then exit). The parent (CLI or UI) never reads our output through a pipe: stdout and
stderr go to RUN_DIR/train.log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

from . import config as config_lib
from . import distributed, runs
from .callbacks import make_callbacks, write_samples
from .child import (STOP, StopRequested, discard_partial_checkpoints, event, explain, log, model_revision,
                    on_sigterm, quiet_libraries, take_device, versions, write_json)
from .faults import install_faults
from .plan import memory_plan, pad_multiple
from .trainer import liger_config, trainer_class

def load_tokenizer_and_template(cfg):
    """The tokenizer plus the template training (and later chat) uses; adds template tokens
    the tokenizer lacks and returns their new ids (their embedding rows get trained)."""
    from . import model as model_lib
    from . import templates

    tokenizer = model_lib.load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    t = cfg.template
    return templates.with_template(tokenizer, t.name, t.custom_jinja, train_on=t.train_on, reasoning=t.reasoning,
                                   system=t.system)


def prepare_data(cfg, tokenizer, template, held_out: list | None = None):
    """Files -> normalised messages -> input_ids + labels (labels.encode_example) -> split/pack.
    HELD_OUT: a list that receives the examples the eval split holds out (core.evaluate_data)."""
    from . import data as data_lib
    from . import dataset as dataset_lib
    from . import tiny

    if cfg.stage != "sft":  # pairs or labelled answers, labelled the same way (core.preference)
        from . import preference

        return preference.prepare_data(cfg, tokenizer, template)
    sources = [s.model_dump() for s in cfg.data.sources]
    for s in sources:
        s["path"] = tiny.resolve_data(s["path"])
    ds, reports = data_lib.load_mixture(sources, seed=cfg.data.seed)
    distributed.planned_steps(cfg, round(len(ds) * (1 - cfg.data.eval_split)))  # before tokenising a typo's worth of rows
    tokenized, stats = dataset_lib.tokenize(ds, tokenizer, template, cfg.template.cutoff_len)
    if stats.kept == 0 and stats.refused == stats.samples:
        raise data_lib.DataError(f"the chat template refused every row; the first: {stats.refusals[0]}")
    if stats.kept == 0:
        raise data_lib.DataError("no sample has a trained token after truncation: raise template.cutoff_len "
                                 f"(now {cfg.template.cutoff_len})")
    eval_ds = None
    if cfg.data.eval_split > 0 and len(tokenized) >= 10:
        # the split depends on the row count and seed only: the example column changes no row's side
        split = tokenized.add_column("source", stats.sources).train_test_split(test_size=cfg.data.eval_split,
                                                                               seed=cfg.data.seed)
        if held_out is not None:
            from . import evaluate_data

            held_out += evaluate_data.held_out(ds, stats.sources, split)
        tokenized, eval_ds = split["train"].remove_columns("source"), split["test"].remove_columns("source")
    if cfg.template.packing:
        tokenized = dataset_lib.pack(tokenized, cfg.template.cutoff_len)
    return tokenized, eval_ds, stats, reports, data_lib.dataset_hash(sources)


def build_trainer(cfg, run_dir: Path, model, tokenizer, template, train_ds, eval_ds, callbacks=None,
                  budget_gib: float | None = None):
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from . import dataset as dataset_lib
    from . import resolve, trackers

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
        output_dir=str(run_dir), disable_tqdm=True,
        # training.report_to: the Trainer's own tracker integration, pointed at its folder (core.trackers)
        report_to=trackers.setup(t.report_to, run_dir) or "none", run_name=Path(run_dir).name, project="lorastudio",
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
        use_liger_kernel=t.kernels in ("loss", "all"), liger_kernel_config=liger_config(t.kernels),
        # batches are pinned: their copy to the GPU need not wait for the previous step to finish
        accelerator_config={"non_blocking": on_cuda},
        # LoRA uses every trainable parameter each step: no DDP search for unused ones
        ddp_find_unused_parameters=False if distributed.is_distributed() else None,
        # early stopping keeps the best checkpoint by eval loss and ends with it loaded
        load_best_model_at_end=t.early_stopping_patience is not None,
        metric_for_best_model="eval_loss" if t.early_stopping_patience is not None else None,
        greater_is_better=False if t.early_stopping_patience is not None else None,
    )
    if cfg.stage != "sft":  # TRL's trainer for the stage, on these arguments (core.preference)
        from . import preference

        return preference.build_trainer(cfg, run_dir, model, tokenizer, train_ds, eval_ds, callbacks, args)
    trainer = trainer_class(t.offload_activations is True)(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=dataset_lib.collator(tokenizer, padding_free, pad_multiple(cfg)), processing_class=tokenizer,
        callbacks=callbacks or [],
    )
    trainer.remove_callback(PrinterCallback)  # our Metrics callback logs one line per step instead
    if t.checkpoint_per_batch is True and t.gradient_checkpointing is True and budget_gib:
        from . import arch as arch_lib
        from . import memory

        most = t.checkpoint_layers if isinstance(t.checkpoint_layers, int) else model.config.get_text_config().num_hidden_layers
        trainer.checkpoint_by_batch(memory.layers_by_batch(cfg, arch_lib.arch_for(cfg.model.name_or_path), budget_gib, most))
    if t.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    return trainer


def train(cfg, run_dir: Path, resume: bool) -> int:
    from transformers import set_seed

    from . import model as model_lib
    from . import templates

    t = cfg.training
    from . import trackers

    if trackers.missing(t.report_to):
        raise config_lib.ConfigError(trackers.missing(t.report_to))
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
    held_out: list[dict] = []
    train_ds, eval_ds, stats, reports, data_hash = prepare_data(cfg, tokenizer, template, held_out)
    if held_out and distributed.is_main():  # the default rows of `lorastudio eval`
        from . import evaluate_data

        evaluate_data.write_rows(run_dir, held_out)
        log(f"eval: {len(held_out)} held-out examples written to {evaluate_data.EVAL_ROWS}")
    summary = stats.summary()
    for r in reports:
        log(f"data: {r.summary()}")
    for note, n in stats.notes.items():
        log(f"template: {note}: {n} rows")
    if stats.refused:
        log(f"template refused {stats.refused} rows; the first: {stats.refusals[0]}")
    log(f"tokens: {summary}" + (f"; packed into {len(train_ds)} rows" if cfg.template.packing else ""))
    write_json(run_dir, dataset_hash=data_hash, template=template.name, template_warnings=warnings,
                    added_tokens=missing,
                    data={"reports": [{"path": r.path, "format": r.format, "rows_used": r.rows_used,
                                       "rows_skipped": r.rows_skipped, "summary": r.summary(),
                                       "skipped": [s.reason for s in r.skipped[:20]]} for r in reports],
                          "tokens": summary})
    event(run_dir, "data", **summary)

    if t.device == "cuda":  # the auto memory settings, now that the longest micro-batch is known
        decided, reasons, budget = memory_plan(cfg, stats.lengths)
        for r in reasons:
            log(f"memory plan: {r}")
        if distributed.is_main():  # config.yaml keeps `auto` (the plan reruns on the rerun's data)
            write_json(run_dir, memory_plan={"settings": decided, "reasons": reasons})

    # 3. model (+ 4/8-bit base, + LoRA or full)
    model = model_lib.load_for_training(cfg, tokenizer, new_ids)
    if cfg.model.adapter_from or cfg.stage != "sft":
        from . import preference

        if cfg.model.adapter_from:
            log(f"adapter: {preference.load_parent(cfg, model)} tensors from {cfg.model.adapter_from}")
        if cfg.stage != "sft":
            log(preference.describe(cfg))
            write_json(run_dir, stage=preference.record(cfg))
    trainable, total = model_lib.count_parameters(model)
    log(f"model: {trainable:,} trainable of {total:,} parameters ({cfg.method}, {cfg.model.dtype}, {t.device})")
    # bitsandbytes' own layers only (PEFT's LoRA wrappers reuse the class names)
    quantized = sum(type(m).__module__.startswith("bitsandbytes") and type(m).__name__ in ("Linear4bit", "Linear8bitLt")
                    for m in model.modules())
    write_json(run_dir, params={"trainable": trainable, "total": total, "quantized_linear": quantized})
    if t.kernels != "off" and missing and not model.config.get_text_config().tie_word_embeddings:
        # the fused loss reads lm_head.weight directly and would miss the trained rows of added tokens
        log("kernels: fused loss off (added tokens train rows of an untied lm_head)")
        cfg.training.kernels = "off"
    padding_free, pad = bool(cfg.template.padding_free or cfg.template.packing), pad_multiple(cfg)
    write_json(run_dir, speed_path={
        "padding_free": padding_free, "packing": cfg.template.packing, "pad_to_multiple_of": pad,
        "kernels": t.kernels, "gradient_checkpointing": t.gradient_checkpointing,
        "checkpoint_layers": t.checkpoint_layers if t.gradient_checkpointing else 0,
        "checkpoint_reentrant": t.checkpoint_reentrant, "optimizer": t.optimizer,
        "offload_activations": t.offload_activations, "embeddings_on_cpu": cfg.model.embeddings_on_cpu,
        "fused_lora": t.fused_lora, "tiled_mlp": t.tiled_mlp, "cudnn_attention": t.cudnn_attention,
        "fp32_upcast": cfg.quantization.fp32_upcast if cfg.method == "qlora" else None,
        "lora_dropout": cfg.lora.dropout if cfg.method != "full" else None,
        "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")})
    log(f"speed path: padding-free {padding_free}, packing {cfg.template.packing}, "
        f"rows padded to a multiple of {pad}, kernels {t.kernels}, fused lora {t.fused_lora}, tiled MLP {t.tiled_mlp}, "
        f"cuDNN attention {t.cudnn_attention}, "
        f"gradient checkpointing {t.gradient_checkpointing}"
        f"{f' ({t.checkpoint_layers} layers, reentrant {t.checkpoint_reentrant})' if t.gradient_checkpointing else ''}, "
        f"fp32 upcast {cfg.quantization.fp32_upcast if cfg.method == 'qlora' else 'n/a'}, lora dropout {cfg.lora.dropout}, "
        f"optimizer {t.optimizer}, offload activations {t.offload_activations}, "
        f"embeddings on cpu {cfg.model.embeddings_on_cpu}, CUDA allocator {os.environ.get('PYTORCH_CUDA_ALLOC_CONF') or 'default'}")

    # 4. train
    trainer = build_trainer(cfg, run_dir, model, tokenizer, template, train_ds, eval_ds,
                            callbacks=make_callbacks(run_dir, cfg, tokenizer, template, model),
                            budget_gib=budget if t.device == "cuda" else None)
    ckpt = runs.last_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        log("resume: no checkpoint found, starting from step 0")
    if ckpt:
        event(run_dir, "resume", checkpoint=str(ckpt), step=int(ckpt.name.split("-")[-1]))
        log(f"resuming from {ckpt.name}")
    write_json(run_dir, status="running")
    STOP["in_training"] = STOP["no_raise"] = True  # from here on Stop is honoured at step boundaries
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    dist = distributed.is_distributed()
    if not dist:  # ranks keep a late SIGTERM as a flag: the final save below is collective
        STOP["in_training"] = False

    # 5. save: adapter (or full model) with tokenizer and the exact template used
    if cfg.stage != "sft":
        preference.drop_reference(model)  # the parent's frozen copy is no part of the result
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
    stopped = distributed.any_rank(STOP["requested"]) if dist else STOP["requested"]
    STOP["in_training"] = False
    st = trainer.state
    if st.best_model_checkpoint:
        write_json(run_dir, best_checkpoint=Path(st.best_model_checkpoint).name, best_eval_loss=st.best_metric)
    if t.early_stopping_patience is not None and not stopped and st.global_step < st.max_steps:
        event(run_dir, "early_stop", step=st.global_step, best_checkpoint=st.best_model_checkpoint,
                          best_eval_loss=st.best_metric)
        log(f"early stop at step {st.global_step}: no better eval loss in {t.early_stopping_patience} evals; "
            f"kept {Path(st.best_model_checkpoint).name} (eval loss {st.best_metric:.4f})")
    event(run_dir, "stopped" if stopped else "end", step=trainer.state.global_step,
                      train_loss=result.training_loss, runtime_s=result.metrics.get("train_runtime"))
    return runs.EXIT_STOPPED if stopped else runs.EXIT_DONE


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lorastudio.core.train")
    ap.add_argument("run_dir")
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)
    run_dir = Path(a.run_dir).resolve()
    from . import memory

    memory.use_allocator()  # before anything touches CUDA
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)
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
        write_json(run_dir, status="starting", rank0_pid=os.getpid(), world_size=distributed.world_size(),
                    started=time.time(), versions=versions(), host=platform.node(), exit_code=None, error=None)
    else:
        me = jobs.live(run_dir)
        if me is None or me.pid != os.getpid():
            # started by hand (not by runs.launch): record this process, so Stop may signal it
            os.environ.setdefault(jobs.TOKEN_ENV, jobs.new_token())
            jobs.register(run_dir, os.getpid(), os.environ[jobs.TOKEN_ENV])
        write_json(run_dir, status="starting", pid=os.getpid(), pgid=os.getpgrp(),
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
                held += take_device(cfg, device, run_dir)
        quiet_libraries()
        from . import data as data_lib
        from . import model as model_lib
        from . import templates

        bad_input = (config_lib.ConfigError, data_lib.DataError, templates.TemplateError, model_lib.ModelError,
                     locks.Busy)
        if os.environ.get("LORASTUDIO_FAULTS"):
            install_faults(os.environ["LORASTUDIO_FAULTS"])
        from . import resolve

        cfg = resolve.resolve(cfg)  # config.yaml was written resolved (core.runs.create_run): checked again here
        if distributed.is_main() and dist:
            distributed.release_ranks(run_dir)
        write_json(run_dir, model_revision=model_revision(cfg))
        code = train(cfg, run_dir, a.resume)
        STOP["no_raise"] = True  # the end is being written: a SIGTERM interrupts nothing
    except StopRequested:
        STOP["no_raise"] = True
        code = runs.EXIT_STOPPED
        event(run_dir, "stopped", step=0)
    except Exception as e:  # noqa: BLE001 - every failure must reach run.json with a message
        STOP["no_raise"] = True
        traceback.print_exc()
        if isinstance(e, OSError):
            discard_partial_checkpoints(run_dir)
        error = explain(e, run_dir)
        if type(e).__name__ == "OutOfMemoryError" and "cfg" in locals():
            from .recovery import oom_retry_overrides

            write_json(run_dir, retry=oom_retry_overrides(cfg))
        code = runs.EXIT_CONFIG if isinstance(e, bad_input) else runs.EXIT_FAILED
        event(run_dir, "failed", error=error)
        log(f"FAILED: {error}")
    status = {runs.EXIT_DONE: "done", runs.EXIT_STOPPED: "stopped"}.get(code, "failed")
    write_json(run_dir, status=status, exit_code=code, error=error, ended=time.time())
    log(f"exit {code} ({status})", all_ranks=dist)
    for lk in held[1:]:  # device locks (the OS would release them at exit anyway)
        lk.release()
    if dist and distributed.is_main():
        distributed.cleanup(run_dir)
    return code


if __name__ == "__main__":
    sys.exit(main())
