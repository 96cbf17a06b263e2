"""Where a training step's time goes: the product's path (core.model.load_for_training) on a
real-length padding-free micro-batch, a few forward+backward+optimizer steps under
torch.profiler, top ops by CUDA and by CPU time; then the same step timed with pieces switched
off. Device:  python bench/profile_step.py MODEL_DIR [--method qlora] [--mb 8]"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import torch
    from transformers import AutoTokenizer

    from lorastudio.core import config as config_lib
    from lorastudio.core import resolve as resolve_lib
    from lorastudio.core import dataset as dataset_lib
    from lorastudio.core import model as model_lib

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--method", default="qlora")
    ap.add_argument("--mb", type=int, default=8)
    ap.add_argument("--tokens", default=".bench/chat_tokens.jsonl")
    ap.add_argument("--gc", default="on")
    ap.add_argument("--kernels", default="off")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    V = json.loads((Path(a.model) / "config.json").read_text())["vocab_size"]
    rows = [json.loads(x) for x in open(a.tokens)][: a.mb * 8]
    rows = [{"input_ids": [i % V for i in r["input_ids"]], "labels": [-100 if x == -100 else x % V for x in r["labels"]]}
            for r in rows]
    raw = {"model": {"name_or_path": a.model}, "method": a.method,
           "lora": {"r": 64, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"]},
           "training": {"gradient_checkpointing": a.gc == "on", "kernels": a.kernels, "device": "cuda"}}
    if a.method == "qlora":
        raw["quantization"] = {"bits": 4}
    cfg = resolve_lib.resolve(config_lib.from_dict(raw))
    model = model_lib.load_for_training(cfg, tok, [])
    model.train()
    collate = dataset_lib.collator(tok, True)
    batches = [{k: (v.cuda() if hasattr(v, "cuda") else v) for k, v in collate(rows[i * a.mb:(i + 1) * a.mb]).items()}
               for i in range(8)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)

    def step(b, fwd_only=False):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**b, use_cache=False).loss
        if not fwd_only:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    base = model.get_base_model()

    def timed(n=4):
        for b in batches[:2]:
            step(b)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for b in batches[2:2 + n]:
            step(b)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n

    ntok = sum(b["input_ids"].shape[1] for b in batches[2:6]) / 4
    variants = [("eager, gc on", True, False), ("eager, gc off", False, False)]
    if a.compile:
        variants += [("compiled layers, gc off", False, True), ("compiled layers, gc on", True, True)]
    compiled = False
    for name, gc, comp in variants:
        if gc:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_disable()
        if comp and not compiled:
            t0 = time.perf_counter()
            for layer in base.model.layers:
                layer.compile(dynamic=True)
            compiled = True
            step(batches[0])
            step(batches[1])
            torch.cuda.synchronize()
            print(f"compile + 2 steps: {time.perf_counter() - t0:.1f} s", flush=True)
        dt = timed()
        print(f"{name}: {ntok:.0f} tokens/step, {dt * 1e3:.0f} ms/step, {ntok / dt:.0f} tok/s, "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for b in batches[3:5]:
                step(b)
            torch.cuda.synchronize()
        ka = prof.key_averages()
        print(ka.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        print(ka.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    # the bare 4-bit matmul vs bf16, for the widest layer
    import bitsandbytes as bnb

    lin = next(m for n, m in model.named_modules() if n.endswith("mlp.down_proj.base_layer"))
    x = torch.randn(int(ntok), lin.in_features, device="cuda", dtype=torch.bfloat16)
    w16 = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    for name, fn in (("dequantize_4bit", lambda: bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state)),
                     ("bf16 matmul", lambda: x @ w16.t()),
                     ("Linear4bit forward", lambda: lin(x))):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        print(f"{name}: {(time.perf_counter() - t) / 20 * 1e6:.0f} us")


if __name__ == "__main__":
    main()
