"""training.mlp_recompute on the device: the MLP that recomputes gate and up in backward
(core.fused_lora.LoRAMLP) against the plain MLP, with liger-kernel's kernels bound to the model
the way Trainer.train() binds them (its SwiGLU forward over the MLPs, then core.fused_lora.rewrap),
bf16 autocast, LoRA and 4-bit QLoRA: the loss, every LoRA gradient and the memory kept for
backward. Device:  python bench/mlp_check.py MODEL_DIR [--tokens .bench/chat_tokens.jsonl]"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> int:
    import torch
    from transformers import AutoTokenizer

    from lorastudio.core import config as config_lib
    from lorastudio.core import dataset as dataset_lib
    from lorastudio.core import fused_lora
    from lorastudio.core import model as model_lib
    from lorastudio.core import resolve as resolve_lib
    from lorastudio.core import trainer as trainer_lib

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", default=".bench/chat_tokens.jsonl")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    V = json.loads((Path(a.model) / "config.json").read_text())["vocab_size"]
    rows = [json.loads(x) for x in open(a.tokens)][:8]
    rows = [{"input_ids": [i % V for i in r["input_ids"]], "labels": [-100 if x == -100 else x % V for x in r["labels"]]}
            for r in rows]
    cuda = torch.cuda.is_available()  # CPU: a dry run of this script (float32, no liger)
    dev = "cuda" if cuda else "cpu"
    batch = {k: (v.to(dev) if hasattr(v, "to") else v) for k, v in dataset_lib.collator(tok, True, 64)(rows).items()}
    batch.pop("num_pad_tokens", None)
    bad = 0
    for method in ("qlora", "lora"):
        res = {}
        for mlps in (0, "all"):
            raw = {"model": {"name_or_path": a.model}, "method": method,
                   "lora": {"r": 16, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"]},
                   "training": {"device": dev, "gradient_checkpointing": False, "mlp_recompute": mlps,
                                **({} if cuda else {"fused_lora": True})}}
            if not cuda:
                raw["model"]["dtype"] = "float32"
            if method == "qlora":
                raw["quantization"] = {"bits": 4}
            cfg = resolve_lib.resolve(config_lib.from_dict(raw))
            torch.manual_seed(0)
            model = model_lib.load_for_training(cfg, tok, [])
            for n, p in model.named_parameters():  # B is zero at init: give every adapter a value
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.02)
            if cfg.training.kernels != "off":  # what Trainer.train() does before the loop
                from liger_kernel.transformers import _apply_liger_kernel_to_instance

                _apply_liger_kernel_to_instance(model=model.get_base_model(), **trainer_lib.liger_config(cfg.training.kernels))
            fused_lora.rewrap(model)
            model.train()
            calls = []
            apply = fused_lora.LoRAMLP.apply
            fused_lora.LoRAMLP.apply = lambda *x: calls.append(1) or apply(*x)
            kept = [0]

            def pack(t):
                if not isinstance(t, torch.nn.Parameter):
                    kept[0] += t.numel() * t.element_size()
                return t

            try:
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda), \
                        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = model(**batch, use_cache=False).loss
                loss.backward()
            finally:
                fused_lora.LoRAMLP.apply = apply
            grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
            res[mlps] = (loss.item(), grads, kept[0], len(calls))
            del model
            if cuda:
                torch.cuda.empty_cache()
        (l0, g0, k0, c0), (l1, g1, k1, c1) = res[0], res["all"]
        worst = max(((g1[n] - g0[n]).norm() / g0[n].norm().clamp_min(1e-30)).item() for n in g0)
        mlp_worst = max(((g1[n] - g0[n]).norm() / g0[n].norm().clamp_min(1e-30)).item() for n in g0 if "mlp" in n)
        ok = abs(l1 - l0) <= 1e-3 * abs(l0) and worst < 2e-2 and c0 == 0 and c1 > 0
        bad += not ok
        print(json.dumps({"check": "mlp_recompute", "method": method, "ok": ok, "loss_plain": l0, "loss_recompute": l1,
                          "max_rel_grad_diff": round(worst, 6), "max_rel_grad_diff_mlp": round(mlp_worst, 6),
                          "saved_mib_plain": round(k0 / 2 ** 20, 1), "saved_mib_recompute": round(k1 / 2 ** 20, 1),
                          "lora_mlp_calls": c1, "tokens": batch["input_ids"].numel()}), flush=True)
    if cuda:  # core.fused_lora's direct NF4 dequantisation against bitsandbytes' own: bit-identical, CPU time
        import time

        import bitsandbytes.functional as bnbf

        raw = {"model": {"name_or_path": a.model}, "method": "qlora", "quantization": {"bits": 4},
               "training": {"device": "cuda", "gradient_checkpointing": False}}
        model = model_lib.load_for_training(resolve_lib.resolve(config_lib.from_dict(raw)), tok, [])
        ws = [m.weight for m in model.modules() if getattr(getattr(m, "weight", None), "quant_state", None) is not None]
        same = all(torch.equal(fused_lora._dequantize_direct(w.data, w.quant_state),
                               bnbf.dequantize_4bit(w.data, w.quant_state)) for w in ws)
        cpu_us = {}
        for name, fn in (("bitsandbytes", lambda w: bnbf.dequantize_4bit(w.data, w.quant_state)),
                         ("direct", lambda w: fused_lora._dequantize_direct(w.data, w.quant_state))):
            for _ in range(2):
                torch.cuda.synchronize()
                t = time.perf_counter()
                for w in ws:
                    fn(w)
                cpu_us[name] = round((time.perf_counter() - t) / len(ws) * 1e6, 1)  # launch side only
            torch.cuda.synchronize()
        bad += not same
        print(json.dumps({"check": "dequant_direct", "ok": same, "weights": len(ws), "cpu_us_per_call": cpu_us,
                          "nested": bool(ws[0].quant_state.nested)}), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
