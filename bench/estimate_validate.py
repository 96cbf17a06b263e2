"""Validate core.estimate against measured peak GPU memory (target: within +-15%).

For each config: a random-init model of the real shape (bench/make_random_model.py, embedded
tokenizer), a few real training steps through the product's own path (core.config.resolve ->
core.model.load_for_training -> core.train.build_trainer) on fixed-length random token rows
(cutoff_len x micro_batch, every row full: the estimator's worst case), each in a fresh child
process. Measured peak process memory = torch.cuda.max_memory_reserved() + the CUDA context
(device used per torch.cuda.mem_get_info minus torch's reserved, after training).

  python bench/estimate_validate.py --dry-run        # CPU: the configs and their estimates
  python bench/estimate_validate.py [--only NAME] [--steps 3] [--models /tmp/lsmodels]   # GPU, ~8 min on H100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from lorastudio.core import config as C  # noqa: E402
from lorastudio.core import resolve as resolve_lib
from lorastudio.core import estimate as E  # noqa: E402
from lorastudio.core import model_configs as MC  # noqa: E402

SHAPE_HUB = {"llama3.1-8b": "meta-llama/Llama-3.1-8B-Instruct", "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
             "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct", "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct"}
# name: (shape, method, cutoff_len, micro_batch)
CONFIGS = {
    "llama8b-qlora-1k": ("llama3.1-8b", "qlora", 1024, 1),
    "llama8b-qlora-2k": ("llama3.1-8b", "qlora", 2048, 1),
    "llama8b-qlora-4k": ("llama3.1-8b", "qlora", 4096, 1),
    "qwen1.5b-lora-2k": ("qwen2.5-1.5b", "lora", 2048, 2),
    "qwen0.5b-full-2k": ("qwen2.5-0.5b", "full", 2048, 2),
    "qwen7b-lora-2k": ("qwen2.5-7b", "lora", 2048, 1),
}


def run_config(name: str, model_dir: str | None, steps: int) -> C.RunConfig:
    shape, method, cutoff, mb = CONFIGS[name]
    return C.from_dict({
        "model": {"name_or_path": model_dir or SHAPE_HUB[shape]},
        "method": method,
        "template": {"cutoff_len": cutoff},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        # explicit, so this machine's estimate and the device's run agree on what they count (the
        # memory plan and liger availability would otherwise differ between the two machines)
        "training": {"micro_batch_size": mb, "grad_accum": 1, "max_steps": steps, "save_steps": 10_000,
                     "learning_rate": 1e-4 if method != "full" else 1e-5, "exclusive": False, "logging_steps": 1,
                     "gradient_checkpointing": True, "optimizer": "adamw_torch_fused",
                     "kernels": os.environ.get("KERNELS", "all"), "offload_activations": False},
    })


def estimate_for(name: str) -> dict:
    shape = CONFIGS[name][0]
    cfg = run_config(name, None, 3)
    return E.estimate(cfg, arch=MC.lookup(SHAPE_HUB[shape]), detect=False)


def child(name: str, model_dir: str, steps: int) -> None:
    """One config in this (fresh) process; prints one JSON line."""
    import torch
    from datasets import Dataset

    from lorastudio.core import model as model_lib
    from lorastudio.core import train as train_lib

    cfg = resolve_lib.resolve(run_config(name, model_dir, steps))
    tok = model_lib.load_tokenizer(cfg.model.name_or_path)
    model = model_lib.load_for_training(cfg, tok, None)
    trainable, total = model_lib.count_parameters(model)
    rows = cfg.training.micro_batch_size * (steps + 1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tok), (rows, cfg.template.cutoff_len), generator=g).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids})
    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"estval-{name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = train_lib.build_trainer(cfg, run_dir, model, tok, None, ds, None)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    torch.cuda.synchronize()
    free, total_mem = torch.cuda.mem_get_info()
    reserved_now = torch.cuda.memory_reserved()
    context = (total_mem - free) - reserved_now
    peak = torch.cuda.max_memory_reserved()
    print("RESULT " + json.dumps(dict(name=name, peak_reserved=peak, peak_allocated=torch.cuda.max_memory_allocated(),
                                      context=context, measured=peak + context, trainable=trainable, total=total,
                                      tokens_per_s=steps * cfg.template.cutoff_len * cfg.training.micro_batch_size / wall,
                                      gpu=torch.cuda.get_device_name(0))), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true", help="print the configs and estimates only (no GPU)")
    ap.add_argument("--only", action="append", help="config name(s) to run")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--models", default="/tmp/lsmodels", help="where random-init models are built")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.model_dir, a.steps)
        return 0
    names = a.only or list(CONFIGS)
    GIB = E.GIB
    print(f"{'config':<18} {'shape':<13} {'method':<6} {'cutoff':>6} {'mb':>3} {'estimate':>9}")
    ests = {}
    for n in names:
        shape, method, cutoff, mb = CONFIGS[n]
        ests[n] = estimate_for(n)
        comp = "  ".join(f"{k}={v:.2f}" for k, v in ests[n]["components"].items())
        print(f"{n:<18} {shape:<13} {method:<6} {cutoff:>6} {mb:>3} {ests[n]['total_gib']:>8.2f}G  {comp}", flush=True)
    if a.dry_run:
        cfg = run_config(names[0], "/tmp/model", a.steps)
        print("\nexample config (model path filled at run time):\n" + C.to_yaml(cfg))
        return 0
    env = {**os.environ,
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = []
    for n in names:
        shape = CONFIGS[n][0]
        mdir = Path(a.models) / shape
        if not (mdir / "config.json").exists():
            t = time.time()
            subprocess.run([sys.executable, str(ROOT / "bench" / "make_random_model.py"), shape, str(mdir)],
                           check=True, env=env, cwd=ROOT)
            print(f"built {shape} in {time.time() - t:.0f}s", flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", n, "--model-dir", str(mdir), "--steps", str(a.steps)],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=400)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{n}: FAILED rc={out.returncode}\n{out.stderr[-3000:]}", flush=True)
            continue
        r = json.loads(line[7:])
        est = ests[n]["total_gib"]
        meas = r["measured"] / GIB
        r.update(estimate_gib=est, measured_gib=meas, error_pct=100 * (est - meas) / meas)
        results.append(r)
        print(f"{n:<18} estimate {est:6.2f} GiB  measured {meas:6.2f} GiB (reserved {r['peak_reserved'] / GIB:.2f} "
              f"+ context {r['context'] / GIB:.2f}; allocated {r['peak_allocated'] / GIB:.2f})  "
              f"error {r['error_pct']:+.1f}%  params {r['total']:,}/{r['trainable']:,}  {r['tokens_per_s']:.0f} tok/s",
              flush=True)
    print("\n| config | estimate GiB | measured GiB | error | card |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['estimate_gib']:.2f} | {r['measured_gib']:.2f} | {r['error_pct']:+.1f}% | {r['gpu']} |")
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "estimate_validate.json").write_text(json.dumps(results, indent=1))
    return 0 if results and all(abs(r["error_pct"]) <= 15 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
