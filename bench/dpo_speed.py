"""A QLoRA DPO step, the project against stock TRL, in one call: speed and peak memory.

    # on the device: a random-init Qwen2.5-7B shape (bench/make_random_model.py), 4-bit NF4
    python bench/dpo_speed.py --out bench/results/dpo_speed.json
    # here, to know it has no bugs: a tiny random shape on CPU, a few steps
    python bench/dpo_speed.py --tiny

Data: alpaca_en_demo (/work/shared/assets/data) as pairs: the row's output is chosen, another
row's output rejected; the Qwen2.5 tokenizer and its own template (/work/shared/assets/tokenizers/qwen2.5;
template auto: the one TRL applies on the stock side).

  project = `lorastudio train` on a stage: dpo config (core.preference: TRL's DPOTrainer under
            LeanTrainer, our labelling and collator, the memory plan, the reference = the 4-bit
            base with the adapter disabled), read back from its metrics.jsonl;
  stock   = what TRL's docs show: from_pretrained with BitsAndBytesConfig NF4 + double quant,
            prepare_model_for_kbit_training, DPOTrainer(peft_config=LoraConfig, DPOConfig(
            gradient_checkpointing=True, bf16=True)) on the conversational prompt/chosen/rejected.
Both: LoRA r=16 alpha=32 on all linear layers, sigmoid loss, beta 0.1, lr 5e-6 constant, seed 42,
the same micro-batch of pairs and cutoff. Each side runs in its own process (clean peak memory).
Reported (JSON, one line per side and a summary): pairs/s and non-pad tokens/s over the steps
after --warmup, seconds per step, the first and last losses (step 1 is ln 2 = 0.693 on both: the
policy starts as its reference), peak memory (CUDA: torch max allocated and reserved; CPU: RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LORASTUDIO_ASSETS", ROOT.parent / "shared" / "assets"))
TINY = dict(vocab_size=152064, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)


def make_pairs(out: Path, n: int) -> Path:
    rows = json.loads((ASSETS / "data" / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    rng = random.Random(0)
    pairs = []
    for i, r in enumerate(rows[:n]):
        prompt = r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
        other = rows[(i + 1 + rng.randrange(len(rows) - 1)) % len(rows)]["output"]
        if other != r["output"]:
            pairs.append({"prompt": [{"role": "user", "content": prompt}],
                          "chosen": [{"role": "assistant", "content": r["output"]}],
                          "rejected": [{"role": "assistant", "content": other}]})
    path = out / "pairs.jsonl"
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    return path


def make_model(out: Path, tiny: bool, shape: str) -> Path:
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        if tiny:
            import torch
            import transformers

            cfg = transformers.Qwen2Config(max_position_embeddings=4096, eos_token_id=151645, pad_token_id=151643,
                                           **TINY)
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(model_dir)
        else:
            subprocess.run([sys.executable, str(ROOT / "bench" / "make_random_model.py"), shape, str(model_dir)],
                           check=True)
    tok = ASSETS / "tokenizers" / "qwen2.5"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # make_random_model's tiny
        (model_dir / name).unlink(missing_ok=True)  # tokenizer: transformers would read its files first
    for f in tok.iterdir():  # the real tokenizer and template
        if f.is_file() and f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "chat_template")):
            shutil.copy(f, model_dir / f.name)
    return model_dir


def run_project(a, model_dir: Path, pairs: Path, work: Path) -> dict:
    import yaml

    cfg = {"stage": "dpo", "model": {"name_or_path": str(model_dir)},
           "data": {"sources": [{"path": str(pairs)}], "eval_split": 0.0},
           "template": {"name": "auto", "cutoff_len": a.cutoff}, "method": "qlora",
           "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
           "preference": {"beta": 0.1, "loss_type": "sigmoid"},
           "training": {"max_steps": a.steps, "micro_batch_size": a.mb, "grad_accum": 1, "learning_rate": 5e-6,
                        "lr_scheduler": "constant", "warmup_ratio": 0.0, "save_steps": 100000, "logging_steps": 1,
                        "exclusive": False, "seed": 42}}
    path = work / "project.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    run_dir = work / "project-run"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "lorastudio.cli", "train", str(path), "--run-dir", str(run_dir)],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"project side failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    return _summary("project", [(e["time"], e["tokens_seen"], e["loss"]) for e in steps], a,
                    peak_mb=max(e["mem_mb"] for e in steps), wall_s=time.time() - t0,
                    plan=json.loads((run_dir / "run.json").read_text()).get("memory_plan"))


def run_stock(a, model_dir: str, pairs: str) -> dict:
    """The stock side, in this process (started as `--side stock` by main)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=dtype,
                                                 device_map={"": 0} if cuda else {"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    marks = []

    class Marks(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                marks.append((time.time(), state.num_input_tokens_seen, logs["loss"]))

    args = DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=a.steps, per_device_train_batch_size=a.mb,
                     gradient_accumulation_steps=1, learning_rate=5e-6, lr_scheduler_type="constant",
                     logging_steps=1, save_strategy="no", report_to="none", bf16=cuda, use_cpu=not cuda,
                     gradient_checkpointing=True, max_length=a.cutoff, beta=0.1, loss_type=["sigmoid"], seed=42,
                     include_num_input_tokens_seen="non_padding", disable_tqdm=True)
    ds = load_dataset("json", data_files=pairs, split="train")
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Marks()],
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    t0 = time.time()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb()
    return _summary("stock", marks, a, peak_mb=peak, wall_s=time.time() - t0,
                    reserved_mb=torch.cuda.max_memory_reserved() / 2**20 if cuda else None)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _summary(side, marks, a, **extra) -> dict:
    """marks: (time, tokens seen, loss) after each step."""
    w = min(a.warmup, len(marks) - 2)
    (t0, n0, _), (t1, n1, _) = marks[w], marks[-1]
    steps = len(marks) - 1 - w
    dt = max(t1 - t0, 1e-9)
    return {"side": side, "steps": len(marks), "timed_steps": steps, "s_per_step": round(dt / steps, 4),
            "pairs_per_s": round(steps * a.mb / dt, 3), "tokens_per_s": round((n1 - n0) / dt, 1),
            "loss_first": round(marks[0][2], 4), "loss_last": round(marks[-1][2], 4),
            "peak_mb": round(extra.pop("peak_mb"), 1), **extra}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a tiny random shape on this machine (CPU): a bug check")
    ap.add_argument("--shape", default="qwen2.5-7b", help="bench/make_random_model.py shape (without --tiny)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--mb", type=int, default=None, help="pairs per micro-batch")
    ap.add_argument("--cutoff", type=int, default=None)
    ap.add_argument("--work", default=None, help="folder for the model, data and runs (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the results JSON here too")
    ap.add_argument("--side", choices=["stock"], help=argparse.SUPPRESS)  # internal: one side per process
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.steps = a.steps or (4 if a.tiny else 12)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 3)
    a.mb, a.cutoff = a.mb or (2 if a.tiny else 4), a.cutoff or (256 if a.tiny else 1024)
    if a.side == "stock":
        print("RESULT " + json.dumps(run_stock(a, a.model, a.pairs)))
        return 0
    work = Path(a.work or tempfile.mkdtemp(prefix="dpo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LORASTUDIO_HOME", str(work / "home"))
    model_dir = make_model(work, a.tiny, a.shape)
    pairs = make_pairs(work, max(64, a.steps * a.mb * 2))
    results = [run_project(a, model_dir, pairs, work)]
    cmd = [sys.executable, __file__, "--side", "stock", "--model", str(model_dir), "--pairs", str(pairs),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--mb", str(a.mb), "--cutoff", str(a.cutoff)]
    proc = subprocess.run(cmd + (["--tiny"] if a.tiny else []), capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"stock side failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    results.append(json.loads(line[len("RESULT "):]))
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    proj, stock = results
    summary = {"card": card, "shape": "tiny" if a.tiny else a.shape, "pairs_per_micro_batch": a.mb,
               "cutoff": a.cutoff, "speedup": round(proj["tokens_per_s"] / max(stock["tokens_per_s"], 1e-9), 3),
               "memory_ratio": round(proj["peak_mb"] / max(stock["peak_mb"], 1e-9), 3)}
    for r in results:
        print(json.dumps(r))
    print(json.dumps(summary))
    if a.out:
        Path(a.out).write_text(json.dumps({"summary": summary, "sides": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
