"""The Trainer callbacks of a run: step, eval and checkpoint events to metrics.jsonl, samples
generated mid-training, the ETA warning, Stop between steps."""

from __future__ import annotations

import time
from pathlib import Path

from . import distributed
from .child import STOP, event, log, write_json

DAY_S = 24 * 3600

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
            event(run_dir, "start", total_steps=state.max_steps, step=state.global_step,
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
                rec.update(_preference_metrics(logs))
                event(run_dir, "step", **rec)
                if done == 3 and eta is not None and eta > DAY_S:  # measured, so said once it is known
                    warning = (f"at this speed the run needs ~{eta / DAY_S:.1f} more days "
                               f"({state.max_steps:,} steps); lower training.epochs or training.max_steps")
                    write_json(run_dir, warnings=[warning])
                    event(run_dir, "warning", message=warning)
                    log(f"WARNING: {warning}")
                log(f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                    f"lr {logs.get('learning_rate', 0):.2e} {rec['tokens_per_s']} tok/s")
                self.t_last, self.tokens_last = now, state.num_input_tokens_seen
            if "eval_loss" in logs:
                event(run_dir, "eval", step=state.global_step, eval_loss=logs["eval_loss"],
                      **_preference_metrics(logs, "eval_"))
                log(f"eval at step {state.global_step}: loss {logs['eval_loss']:.4f}")

        def on_save(self, args, state, control, **kw):
            path = run_dir / f"checkpoint-{state.global_step}"
            event(run_dir, "checkpoint", step=state.global_step, path=str(path))

        def on_step_end(self, args, state, control, **kw):
            if t.sample_every and t.sample_prompts and state.global_step % t.sample_every == 0:
                write_samples(run_dir, cfg, model_for_samples, tokenizer, template, state.global_step,
                              wrapped=kw.get("model"))
            if distributed.is_distributed():
                # Stop is agreed by all ranks at this step boundary (all-reduce of the flag), so
                # every rank saves the same checkpoint and leaves the loop on the same step
                STOP["requested"] = distributed.any_rank(STOP["requested"])
            if STOP["requested"]:
                control.should_save = True  # a checkpoint to resume from
                control.should_training_stop = True
            return control

    return [Metrics()]


PREFERENCE_METRICS = ("rewards/", "logps/", "kl", "nll_loss", "log_odds_ratio")


def _preference_metrics(logs: dict, prefix: str = "") -> dict:
    """The preference trainers' own numbers (rewards/chosen, rewards/margins, rewards/accuracies...)."""
    return {k: v for k, v in logs.items() if k.startswith(prefix)
            and k[len(prefix):].startswith(PREFERENCE_METRICS) and isinstance(v, (int, float))}


def _memory_mb() -> float:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


def write_samples(run_dir, cfg, model, tokenizer, template, step, wrapped=None):
    """Sample replies. Sharded weights (FSDP, ZeRO-3): every rank generates inside a full-params
    gather; otherwise only rank 0 generates. Rank 0 writes the events."""
    from . import generate

    if distributed.is_distributed() and not distributed.sharded(cfg) and not distributed.is_main():
        return
    with distributed.full_params(wrapped) if distributed.sharded(cfg) else _nullctx(), autocast(cfg):
        for prompt in cfg.training.sample_prompts:
            reply = generate.reply(model, tokenizer, template, [{"role": "user", "content": prompt}],
                                   max_new_tokens=cfg.training.sample_max_new_tokens, greedy=True)
            event(run_dir, "sample", step=step, prompt=prompt, reply=reply)
            log(f"sample @ {step}: {prompt!r} -> {reply!r}")


def _nullctx():
    import contextlib

    return contextlib.nullcontext()


def autocast(cfg):
    """The Trainer's own autocast for generation mid-training: the LoRA layers expect it (16-bit
    input, fp32 adapter weights, core.model.load_for_training)."""
    if cfg.training.device != "cuda" or cfg.model.dtype == "float32":
        return _nullctx()
    import torch

    from .model import torch_dtype

    return torch.autocast("cuda", dtype=torch_dtype(cfg.model.dtype))
