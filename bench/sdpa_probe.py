"""SDPA backends on one long causal row (the long-context step's attention), one layer:
forward and forward+backward seconds and TFLOP/s per backend, Llama-3.1-8B heads (32 query,
8 key/value, dim 128), with KV heads shared (enable_gqa) and repeated (repeat_kv).

    python3 bench/sdpa_probe.py [SEQ ...]     # default 348160; prints one JSON line per try
"""
import json
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

H, KV, D = 32, 8, 128
seqs = [int(x) for x in sys.argv[1:]] or [348160]
backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
print("torch", torch.__version__, torch.cuda.get_device_name(0), "cudnn", torch.backends.cudnn.version(), flush=True)


def once(L, backend, gqa, backward):
    q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    k = torch.randn(1, KV, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    v = torch.randn(1, KV, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with sdpa_kernel([backend]):
        kk, vv = (k, v) if gqa else (k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1))
        o = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
        if backward:
            o.backward(torch.ones_like(o))
    torch.cuda.synchronize()
    return time.perf_counter() - t


for name, backend in backends.items():
    for gqa in (True, False):
        for backward in (False, True):
            try:
                once(4096, backend, gqa, backward)  # warm-up: plans, kernel loads
                for L in seqs:
                    s = once(L, backend, gqa, backward)
                    flop = 2 * L * L * D * H * (3.5 if backward else 1)  # causal: half of 4*L^2*D*H; bwd = 2.5x fwd
                    print(json.dumps({"backend": name, "gqa": gqa, "backward": backward, "seq": L,
                                      "s": round(s, 3), "tflops": round(flop / s / 1e12, 1)}), flush=True)
            except Exception as e:  # noqa: BLE001 - a backend that refuses these shapes is a result
                print(json.dumps({"backend": name, "gqa": gqa, "backward": backward, "error": str(e)[:200]}), flush=True)
            torch.cuda.empty_cache()
