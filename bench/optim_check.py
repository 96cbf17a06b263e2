"""core.optim on the device: bitsandbytes' 8-bit AdamW as the Trainer builds it for
adamw_bnb_8bit (core.optim: no device sync per tensor, the CUDA entry point called directly)
against bitsandbytes' own class and its paged variant, and torch's fused AdamW, on the LoRA
tensors of a real shape (fp32, r=64 on the 7 projections: 448 tensors on Llama-3.1-8B).
Checks the parameters and 8-bit state bit for bit after the same steps, and times a step:
the CPU time of step() and the wall time of a step with the GPU kept busy (a queued matmul
stands in for the next forward, which a sync inside step() keeps from starting).

    python bench/optim_check.py [--shape llama3.1-8b] [--steps 20]        # CPU: a dry run"""

from __future__ import annotations

import argparse
import json
import time


def main() -> int:
    import torch

    from lorastudio.core import arch as arch_lib
    from lorastudio.core import model_configs
    from lorastudio.core import optim as optim_lib

    import bitsandbytes as bnb

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    from make_random_model import SHAPES  # bench/: the benchmark's model shapes

    cls_name, kw = SHAPES[a.shape]
    arch = model_configs.from_config_json({"model_type": cls_name[:-len("Config")].lower(), **kw})
    shapes = arch_lib.linear_shapes(arch)
    L = arch_lib.dims(arch)["L"] if cuda else 1  # (CPU: one layer at r=4, a dry run)
    r = a.r if cuda else 4
    dims = [(r, i) for i, o in shapes.values()] + [(o, r) for i, o in shapes.values()]
    dims = dims * L

    def params(seed=0):
        g = torch.Generator(device=dev).manual_seed(seed)
        return [torch.nn.Parameter(torch.randn(d, generator=g, device=dev) * 0.02) for d in dims]

    grads = []
    g = torch.Generator(device=dev).manual_seed(1)
    for _ in range(3):
        grads.append([torch.randn(d, generator=g, device=dev) * 1e-3 for d in dims])
    busy = torch.randn(4096 if cuda else 64, 4096 if cuda else 64, device=dev, dtype=torch.bfloat16 if cuda else torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    kw = dict(lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    kinds = {"bitsandbytes AdamW 8-bit": lambda ps: bnb.optim.AdamW(ps, optim_bits=8, **kw),
             "bitsandbytes paged AdamW 8-bit": lambda ps: bnb.optim.PagedAdamW(ps, optim_bits=8, **kw),
             "core.optim AdamW 8-bit (adamw_bnb_8bit)": lambda ps: optim_lib.without_syncs(bnb.optim.AdamW)(
                 ps, optim_bits=8, **kw),
             "core.optim paged AdamW 8-bit": lambda ps: optim_lib.without_syncs(bnb.optim.PagedAdamW)(
                 ps, optim_bits=8, **kw),
             "torch fused AdamW": lambda ps: torch.optim.AdamW(ps, fused=cuda, **kw)}
    res, finals = [], {}
    for name, make in kinds.items():
        ps = params()
        opt = make(ps)
        cpu_s, wall_s = [], []
        for i in range(a.steps):
            for p, gr in zip(ps, grads[i % 3]):
                p.grad = gr.clone()
            for _ in range(8):  # ~the GPU work a step queues before the optimizer runs
                busy @ busy
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(8):
                busy @ busy  # queued behind the step: a sync inside step() waits for these too
            opt.step()
            c1 = time.process_time()
            for _ in range(8):
                busy @ busy  # the next forward, queued once step() returns
            sync()
            if i >= 3:
                cpu_s.append(c1 - c0)
                wall_s.append(time.perf_counter() - t0)
        finals[name] = (ps, opt)
        r = {"optimizer": name, "tensors": len(ps), "params": sum(p.numel() for p in ps),
             "step_cpu_ms": round(1e3 * sum(cpu_s) / len(cpu_s), 2),
             "step_wall_ms_with_busy_gpu": round(1e3 * sum(wall_s) / len(wall_s), 2),
             "state_gib": round(sum(t.numel() * t.element_size() for s in opt.state.values()
                                    for t in s.values() if torch.is_tensor(t)) / 2**30, 3)}
        res.append(r)
        print(json.dumps(r), flush=True)
    bad = 0
    for a_name, b_name in (("bitsandbytes AdamW 8-bit", "core.optim AdamW 8-bit (adamw_bnb_8bit)"),
                           ("bitsandbytes paged AdamW 8-bit", "core.optim paged AdamW 8-bit")):
        (pa, oa), (pb, ob) = finals[a_name], finals[b_name]
        same_p = all(torch.equal(x, y) for x, y in zip(pa, pb))
        same_s = all(torch.equal(oa.state[x]["state1"], ob.state[y]["state1"])
                     and torch.equal(oa.state[x]["absmax2"], ob.state[y]["absmax2"])
                     for x, y in zip(pa, pb) if oa.state[x]["state1"].dtype == torch.uint8)
        line = {"check": f"{b_name} vs {a_name}", "params_equal": same_p, "state_equal": same_s}
        print(json.dumps(line), flush=True)
        res.append(line)
        bad += not (same_p and same_s)
    if a.out:
        with open(a.out, "a") as f:
            for r in res:
                f.write(json.dumps(r) + "\n")
    print("OPTIM CHECK", "FAILED" if bad else "OK")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
