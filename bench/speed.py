"""Training speed and memory: the product's default path vs stock HF Trainer + PEFT + bitsandbytes,
on the same samples in the same order, one process per side (clean memory figures).

    # here (CPU): real chat lengths, alpaca_en_demo rendered with the Qwen2.5 tokenizer + template
    python bench/speed.py prep .bench
    # on the device (bench/gpu_speed.sh runs these for a shape group, stock baseline in the same call)
    python bench/speed.py run --model /tmp/m --tokens .bench/chat_tokens.jsonl --side stock --method qlora
    python bench/speed.py run --model /tmp/m --tokens .bench/chat_tokens.jsonl --side fast --method qlora

Stock = what the PEFT/bitsandbytes docs show: BitsAndBytesConfig NF4 + double quant,
prepare_model_for_kbit_training, get_peft_model, Trainer(gradient_checkpointing=True, bf16=True),
rows padded to the longest of each micro-batch (DataCollatorForSeq2Seq). Fast = the product's own
path (core.model.load_for_training + core.train.build_trainer with the resolved config), every
switch at its default unless a flag says otherwise. Both: LoRA r=64 alpha=16 on all 7 projections
(XTuner's oasst1 recipe), same optimizer, constant LR 2e-4, seed 42, same micro-batch of samples.

Reported per run (JSON): non-pad tokens/s over the steps after --warmup, loss per step, peak
memory three ways (torch allocated, torch reserved, and the device's used memory sampled every
10 ms = CUDA context + allocator + bitsandbytes paged/managed memory: the process is alone on the
card), MFU = 4 * N_matmul * tokens/s / 989e12 (model FLOPs of the frozen matmuls: forward + input
gradient; no recompute, no attention), card name, versions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16


def prep(out_dir: str, dataset: str = "alpaca_en_demo.json", tokenizer: str = "qwen2.5") -> None:
    """Tokenise a real dataset with a real tokenizer and its template through the product's own
    labelling (core.train.prepare_data), no truncation below 4096: input_ids + labels per row."""
    from lorastudio.core import config as config_lib
    from lorastudio.core import train as train_lib

    shared = ROOT.parent / "shared" / "assets"
    cfg = config_lib.from_dict({"model": {"name_or_path": str(shared / "tokenizers" / tokenizer)},
                                "data": {"sources": [{"path": str(shared / "data" / dataset)}]},
                                "template": {"cutoff_len": 4096}})
    tok, template, _missing, _ids = train_lib.load_tokenizer_and_template(cfg)
    ds, _eval, stats, _reports, _hash = train_lib.prepare_data(cfg, tok, template)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "chat_tokens.jsonl", "w") as f:
        for r in ds:
            f.write(json.dumps({"input_ids": r["input_ids"], "labels": r["labels"]}) + "\n")
    lens = sorted(stats.lengths)
    print(f"{out / 'chat_tokens.jsonl'}: {len(lens)} rows of {dataset} with the {tokenizer} template; "
          f"mean {statistics.mean(lens):.0f}, p50 {lens[len(lens) // 2]}, p90 {lens[int(len(lens) * 0.9)]}, "
          f"max {lens[-1]} tokens")


# ---------------------------------------------------------------- one measured run

class MemSampler(threading.Thread):
    """The device's used memory (total - free), sampled every 10 ms: CUDA context, the caching
    allocator and bitsandbytes' paged (managed) optimizer state all show up here."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, False

    def run(self):
        import torch

        while not self.stop:
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(0.01)


def rows_for(a, vocab: int) -> list[dict]:
    if a.seq:  # fixed-length rows of random ids, every token trained (the 1 x seq configs)
        import torch

        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (max(a.steps, 1) * a.mb, a.seq), generator=g).tolist()
        return [{"input_ids": x, "labels": x} for x in ids]
    rows = [json.loads(x) for x in open(a.tokens)]
    # ids stay below this model's vocab (Qwen2.5's 151k ids on a 128k-vocab Llama)
    return [{"input_ids": [i % vocab for i in r["input_ids"]],
             "labels": [-100 if x == -100 else x % vocab for x in r["labels"]]} for r in rows]


def matmul_params(model_dir: str) -> int:
    from lorastudio.core import arch, model_configs

    pc = arch.param_counts(model_configs.from_config_json(json.loads((Path(model_dir) / "config.json").read_text())))
    return pc["linear"] + pc["embedding"]  # decoder linears + the lm_head (tied or not, it is a matmul)


def build_stock(a, tokenizer, ds, callbacks):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments, set_seed)

    set_seed(42)
    if a.cudnn_sdpa == "off":  # attribution: the product's attention setting on the stock side
        torch.backends.cuda.enable_cudnn_sdp(False)
    kw = {}
    if a.method == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa", device_map={"": 0 if cuda else "cpu"}, **kw)
    model.config.use_cache = False
    if a.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=a.gc != "off")
    torch.manual_seed(42)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=a.dropout, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=a.workdir, report_to="none", disable_tqdm=True, max_steps=a.steps,
        per_device_train_batch_size=a.mb, gradient_accumulation_steps=1, learning_rate=2e-4,
        lr_scheduler_type="constant", warmup_steps=0, optim=a.optim, bf16=cuda, use_cpu=not cuda, seed=42, data_seed=42,
        gradient_checkpointing=a.gc != "off", gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1, save_strategy="no", remove_unused_columns=False, include_num_input_tokens_seen="non_padding")
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    return Trainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=callbacks), {}


def build_fast(a, tokenizer, ds, callbacks):
    from lorastudio.core import config as config_lib
    from lorastudio.core import resolve as resolve_lib
    from lorastudio.core import model as model_lib
    from lorastudio.core import plan as plan_lib
    from lorastudio.core import train as train_lib

    training = {"micro_batch_size": a.mb, "grad_accum": 1, "max_steps": a.steps, "learning_rate": 2e-4,
                "lr_scheduler": "constant", "warmup_ratio": 0, "save_steps": 1 if a.steps_per_call else 10 ** 6,
                "logging_steps": 1,
                "device": "auto", "exclusive": False, "sample_prompts": [], "seed": 42}
    if a.optim != "auto":
        training["optimizer"] = a.optim
    if a.gc != "default":
        training["gradient_checkpointing"] = a.gc == "on"
    if a.gc_layers >= 0:
        training["checkpoint_layers"] = a.gc_layers
    if a.kernels != "default":
        training["kernels"] = a.kernels
    if a.fused != "default":
        training["fused_lora"] = a.fused == "on"
    if a.cudnn_fast != "default":
        training["cudnn_attention"] = a.cudnn_fast == "on"
    if a.reentrant != "default":
        training["checkpoint_reentrant"] = a.reentrant == "on"
    if a.mlp_recompute != "default":
        training["mlp_recompute"] = a.mlp_recompute if a.mlp_recompute == "all" else int(a.mlp_recompute)
    template = {"cutoff_len": 1 << 20}
    if a.pad:
        template["pad_to_multiple_of"] = a.pad
    raw = {"model": {"name_or_path": a.model, **({} if a.emb_cpu == "default" else {"embeddings_on_cpu": a.emb_cpu == "on"})},
           "method": a.method,
           "lora": {"r": 64, "alpha": 16, "dropout": a.dropout, "target_modules": TARGETS},
           "template": template, "training": training}
    if a.method == "qlora":
        raw["quantization"] = {"bits": 4}
    cfg = resolve_lib.resolve(config_lib.from_dict(raw))
    if a.gpu_mem:
        cfg.training.gpu_memory_gib = a.gpu_mem
    if cfg.training.device == "cuda":  # what the training child does once the data is known
        _decided, why, budget = plan_lib.memory_plan(cfg, [len(r["input_ids"]) for r in ds])
        print("memory plan:", "; ".join(why), flush=True)
        plan_line = "; ".join(why)
    model = model_lib.load_for_training(cfg, tokenizer, [])
    trainer = train_lib.build_trainer(cfg, Path(a.workdir), model, tokenizer, None, ds, None, callbacks=callbacks,
                                      budget_gib=budget if cfg.training.device == "cuda" else None)
    t = cfg.training
    return trainer, {"_cfg": cfg, "memory_plan": plan_line if t.device == "cuda" else None,
                     "optimizer": t.optimizer, "gradient_checkpointing": t.gradient_checkpointing,
                     "checkpoint_layers": t.checkpoint_layers, "checkpoint_reentrant": t.checkpoint_reentrant,
                     "mlp_recompute": t.mlp_recompute,
                     "embeddings_on_cpu": cfg.model.embeddings_on_cpu, "offload_activations": t.offload_activations,
                     "kernels": t.kernels, "fused_lora": t.fused_lora, "padding_free": cfg.template.padding_free,
                     "tiled_mlp": t.tiled_mlp, "cudnn_attention": t.cudnn_attention,
                     "pad_to_multiple_of": cfg.template.pad_to_multiple_of,
                     "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                     "fp32_upcast": cfg.quantization.fp32_upcast}


def run(a) -> dict:
    import datasets
    import torch
    from transformers import AutoConfig, AutoTokenizer, TrainerCallback

    torch.backends.cuda.matmul.allow_tf32 = True  # both sides; only fp32 matmuls (stock's upcasts) see it
    vocab = AutoConfig.from_pretrained(a.model).get_text_config().vocab_size
    ds = datasets.Dataset.from_list(rows_for(a, vocab))
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    sampler = MemSampler()
    steps: list[dict] = []
    span: dict = {}

    cuda = torch.cuda.is_available()  # CPU: a dry check of the harness on a tiny model (no memory figures)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class Timer(TrainerCallback):
        # Throughput is wall-clock over the timed steps with one GPU sync at each end: a sync
        # per step would stall the CPU's launch queue and charge both sides for the harness.
        # Per-step times are then the CPU's view (a step's work may finish in the next one).
        def on_step_begin(self, args, state, control, **kw):
            if len(steps) == a.warmup or a.sync_steps:
                sync()
            if len(steps) == a.warmup:
                span.update(t0=time.perf_counter(), tok0=state.num_input_tokens_seen)
            self.on_step_begin_profile(state)
            self.t0, self.tok0 = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == state.max_steps or a.sync_steps:
                sync()
            now = time.perf_counter()
            steps.append({"step": state.global_step, "s": now - self.t0,
                          "tokens": state.num_input_tokens_seen - self.tok0})
            span.update(t1=now, tok1=state.num_input_tokens_seen)
            self.on_step_end_profile(state)

        def on_step_begin_profile(self, state):
            if a.pyspy and len(steps) == a.warmup:  # sampled Python stacks of the timed steps
                import os
                import subprocess

                try:
                    subprocess.Popen(["py-spy", "record", "--pid", str(os.getpid()), "--duration", str(a.pyspy),
                                      "--rate", "200", "--nonblocking", "--format", "raw", "-o", a.pyspy_out])
                except OSError as e:
                    print(f"py-spy not started: {e}", flush=True)
            if a.profile and state.global_step == 8:
                from torch.profiler import ProfilerActivity, profile

                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()

        def on_step_end_profile(self, state):
            if a.profile and state.global_step == 8 + a.profile:
                self.prof.__exit__(None, None, None)
                ka = self.prof.key_averages()
                print(ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
                print(ka.table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = logs["loss"]

    t_load = time.perf_counter()
    if cuda:
        torch.cuda.init()
        sampler.start()
    build = build_stock if a.side == "stock" else build_fast
    trainer, resolved = build(a, tokenizer, ds, [Timer()])
    load_s = time.perf_counter() - t_load
    cfg = resolved.pop("_cfg", None)
    largest = [0]  # tokens (pad included) of the largest micro-batch that ran: what the peak saw
    lengths = set()  # every micro-batch size that ran
    prepare = trainer._prepare_inputs

    def _prepare_inputs(inputs):
        if isinstance(inputs, dict) and "input_ids" in inputs:
            largest[0] = max(largest[0], inputs["input_ids"].numel())
            lengths.add(inputs["input_ids"].numel())
        return prepare(inputs)

    trainer._prepare_inputs = _prepare_inputs
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    resume = None
    if a.steps_per_call:  # a run longer than one device call: resume where the last call stopped
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(a.workdir) if Path(a.workdir).is_dir() else None
        first = int(resume.rsplit("-", 1)[-1]) if resume else 0

        class StopAfter(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= first + a.steps_per_call:
                    control.should_save = control.should_training_stop = True

        trainer.add_callback(StopAfter())
        print(f"resuming from {resume or 'the start'}; {a.steps_per_call} step(s) in this call", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    sync()
    time.sleep(0.05)
    sampler.stop = True
    gib = (lambda f: round(f() / 2 ** 30, 2)) if cuda else (lambda f: None)
    timed = steps[a.warmup:]
    tok = span["tok1"] - span["tok0"] if "t0" in span else 0
    sec = span["t1"] - span["t0"] if "t0" in span else 0.0
    tps = tok / sec if sec else 0.0
    n_mm = matmul_params(a.model)
    predicted = None
    if cfg is not None and cuda:  # the memory model at the largest micro-batch that ran
        from lorastudio.core import arch as arch_lib
        from lorastudio.core import memory

        arch, by_batch = arch_lib.arch_for(a.model), getattr(trainer, "_layers_for", None)

        def at(n):  # the memory model for the batch of n tokens as it ran (its checkpointed layers, MLPs)
            c = memory.at_tokens(cfg, n)
            if by_batch and by_batch(n):
                c.training.checkpoint_layers = by_batch(n)
            elif by_batch:
                c.training.gradient_checkpointing = False
            if by_batch and hasattr(by_batch, "mlp"):
                c.training.mlp_recompute = by_batch.mlp(n)
            return memory.total_gib(c, arch)

        predicted = round(max(at(n) for n in lengths), 2)
    return {
        "largest_batch_tokens": largest[0], "predicted_peak_gib": predicted,
        "checkpointed_layers_by_step": dict(getattr(trainer, "checkpointed", None) or {}),
        # model.embeddings_on_cpu: lookups that copied ids back from the GPU (a sync each)
        "cpu_embedding_syncs": getattr(trainer.model.get_input_embeddings(), "synced", None),
        "resumed_from": resume, "global_step": trainer.state.global_step,
        "side": a.side, "method": a.method, "model": Path(a.model).name, "dropout": a.dropout,
        "micro_batch": a.mb, "seq": a.seq or "chat", "steps": len(steps), "timed_steps": len(timed),
        "non_pad_tokens_per_s": round(tps, 1), "mfu": round(4 * n_mm * tps / PEAK_FLOPS, 4),
        "tokens_per_step_mean": round(tok / max(1, len(timed)), 1),
        "peak_allocated_gib": gib(torch.cuda.max_memory_allocated), "peak_reserved_gib": gib(torch.cuda.max_memory_reserved),
        "peak_device_used_gib": gib(lambda: sampler.peak),
        "losses": [s.get("loss") for s in steps], "step_s": [round(s["s"], 4) for s in steps],
        "load_s": round(load_s, 1), "gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "resolved": resolved,
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "bitsandbytes")},
        "matmul_params": n_mm,
    }


def bisect_stock(a) -> dict:
    """Stock's longest trainable sequence (one full step: forward, backward, optimizer) with
    torch's allocator capped at a.cap GiB: doubling from 4096, then bisection to 1024 tokens.
    The model is loaded once; each try is a fresh Trainer over one row of random ids."""
    import gc

    import datasets
    import torch
    from transformers import AutoConfig, AutoTokenizer, Trainer

    total = torch.cuda.mem_get_info()[1]
    torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap * 2 ** 30 / total))
    vocab = AutoConfig.from_pretrained(a.model).get_text_config().vocab_size
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    a.steps, a.mb = 1, 1
    base_trainer, _ = build_stock(a, tokenizer, datasets.Dataset.from_list([{"input_ids": [1], "labels": [1]}]), [])
    model, args, collator = base_trainer.model, base_trainer.args, base_trainer.data_collator
    tries: dict[int, bool] = {}

    def fits(n: int) -> bool:
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        ds = datasets.Dataset.from_list([{"input_ids": ids, "labels": ids}])
        ok = True
        try:
            Trainer(model=model, args=args, train_dataset=ds, data_collator=collator).train()
        except torch.OutOfMemoryError:
            ok = False
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        tries[n] = ok
        print(f"stock seq {n}: {'ok' if ok else 'OOM'} (peak reserved {torch.cuda.max_memory_reserved() / 2**30:.1f} GiB)",
              flush=True)
        torch.cuda.reset_peak_memory_stats()
        return ok

    lo, hi = 0, 4096
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 1024 * 1024
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return {"label": a.label or "stock-bisect", "cap_gib": a.cap, "stock_max_seq": lo, "first_oom": hi,
            "tries": tries, "gpu": torch.cuda.get_device_name(0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/speed.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prep")
    p.add_argument("out")
    p.add_argument("--dataset", default="alpaca_en_demo.json")
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--tokens", help="chat_tokens.jsonl from `prep` (ignored with --seq)")
    r.add_argument("--side", choices=["stock", "fast"], required=True)
    r.add_argument("--method", choices=["qlora", "lora"], default="qlora")
    r.add_argument("--mb", type=int, default=8, help="samples per micro-batch (= per optimizer step)")
    r.add_argument("--seq", type=int, default=0, help="fixed-length random rows instead of chat data")
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s")
    r.add_argument("--dropout", type=float, default=0.0)
    r.add_argument("--optim", default="auto", help="auto: the product's default; stock: the Trainer's default")
    r.add_argument("--gc", default="default", help="on/off/default (stock: on unless off)")
    r.add_argument("--gc-layers", type=int, default=-1, help="fast side: training.checkpoint_layers (-1: auto)")
    r.add_argument("--reentrant", default="default", choices=["default", "on", "off"],
                   help="fast side: training.checkpoint_reentrant (default: auto)")
    r.add_argument("--mlp-recompute", default="default",
                   help="fast side: training.mlp_recompute (0 off, all, a count; default: auto)")
    r.add_argument("--emb-cpu", default="default", choices=["default", "on", "off"],
                   help="fast side: model.embeddings_on_cpu (default: auto)")
    r.add_argument("--kernels", default="default", help="fast side: off/loss/all/default")
    r.add_argument("--fused", default="default", help="fast side: fused LoRA layers on/off/default")
    r.add_argument("--pad", type=int, default=0, help="fast side: template.pad_to_multiple_of (0: default)")
    r.add_argument("--cudnn-sdpa", default="on", choices=["on", "off"], help="stock side: torch's default (on) or off")
    r.add_argument("--profile", type=int, default=0, help="profile this many steps from step 9; print top ops")
    r.add_argument("--pyspy", type=int, default=0, help="seconds of py-spy sampling from the first timed step")
    r.add_argument("--pyspy-out", default="pyspy.txt", help="collapsed stacks (py-spy --format raw)")
    r.add_argument("--sync-steps", action="store_true", help="sync the GPU at every step boundary (attribution)")
    r.add_argument("--gpu-mem", type=float, default=0, help="fast side: training.gpu_memory_gib (the memory budget)")
    r.add_argument("--bisect", action="store_true", help="stock side: longest trainable --seq under --cap GiB")
    r.add_argument("--cap", type=float, default=0, help="GiB cap for --bisect (fast side: its memory budget)")
    r.add_argument("--cudnn-fast", default="default", choices=["default", "on", "off"],
                   help="fast side: training.cudnn_attention (default: auto)")
    r.add_argument("--steps-per-call", type=int, default=0,
                   help="fast side: run this many of --steps, checkpoint each, resume from --workdir's last")
    r.add_argument("--label", default="")
    r.add_argument("--out", default="")
    r.add_argument("--workdir", default="/tmp/speed-work")
    a = ap.parse_args(argv)
    if a.cmd == "prep":
        prep(a.out, a.dataset)
        return 0
    if a.side == "stock" and a.optim == "auto":
        a.optim = "adamw_torch_fused"  # the Trainer's own default (torch >= 2.8)
    if a.side == "fast":  # the training child's allocator (stock keeps torch's default)
        from lorastudio.core import memory

        memory.use_allocator()
    if a.bisect:
        res = bisect_stock(a)
    else:
        if a.cap and a.side == "fast" and not a.gpu_mem:
            a.gpu_mem = a.cap
        res = run(a)
        res["label"] = a.label
    line = json.dumps(res)
    print("RESULT " + line, flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
