"""How fast could a training step be without its CPU cost? The fast path is CPU-bound on a GPU
(docs/BENCHMARKS.md, Training speed: ~0.1 s of GPU work in a 0.3-0.4 s step). This probe builds the
product's model (core.model.load_for_training, default fast settings), pads each packed
micro-batch of real chat samples to one bucket length (the padding is its own segment: label
-100, positions restarting, never attended to by real tokens), and times the same
forward + backward + fused AdamW step three ways in one process:
  eager            the step as the product runs it (minus the Trainer)
  eager, bucketed  the same on bucket-length rows (what padding to buckets costs)
  graph            the bucketed step captured once in a CUDA graph and replayed on new data
and checks the graph's losses against eager on the same batches.

    python bench/graph_probe.py MODEL_DIR [--method qlora] [--bucket 2048] [--steps 20]

Needs CUDA. On CPU (--dry) it runs the eager parts on a tiny model to check the harness."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from speed import TARGETS, rows_for  # noqa: E402 - bench/ is this script's own directory


def batches(path: str, vocab: int, mb: int, bucket: int, n: int, tokenizer):
    """n micro-batches of up to mb chat samples, each one padding-free row from the product's
    collator; with bucket > 0 samples that would not fit are left for the next batch and the row
    is padded to bucket tokens by a trailing segment (labels -100, positions restarting).
    Returns dicts of CPU tensors, the segment index of each token and the real token count."""
    import argparse

    import torch

    from lorastudio.core import dataset as dataset_lib

    collate = dataset_lib.collator(tokenizer, padding_free=True)
    rows = rows_for(argparse.Namespace(seq=0, tokens=path), vocab)
    out, i = [], 0
    while len(out) < n and i < len(rows):
        take, real = [], 0
        while len(take) < mb and i < len(rows):
            k = len(rows[i]["input_ids"])
            if bucket and real + k > bucket - 1:
                break
            take.append(rows[i])
            real += k
            i += 1
        b = collate(take)
        if bucket:
            pad = bucket - real
            b = {"input_ids": torch.cat([b["input_ids"], torch.full((1, pad), tokenizer.pad_token_id)], 1),
                 "labels": torch.cat([b["labels"], torch.full((1, pad), -100)], 1),
                 "position_ids": torch.cat([b["position_ids"], torch.arange(pad)[None]], 1)}
        doc = torch.cumsum((b["position_ids"][0] == 0).long(), 0)
        out.append({"input_ids": b["input_ids"], "labels": b["labels"], "position_ids": b["position_ids"],
                    "doc": doc, "real": real})
    return out


def block_causal(doc, device):
    """(1, 1, L, L) bool: a token sees earlier tokens of its own segment only."""
    import torch

    doc = doc.to(device)
    L = doc.shape[0]
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    return (causal & (doc[:, None] == doc[None, :]))[None, None]


def main() -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from lorastudio.core import config as config_lib
    from lorastudio.core import resolve as resolve_lib
    from lorastudio.core import model as model_lib

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--method", default="qlora")
    ap.add_argument("--tokens", default=".bench/chat_tokens.jsonl")
    ap.add_argument("--mb", type=int, default=8)
    ap.add_argument("--bucket", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dry", action="store_true", help="CPU: eager parts only, on a tiny model")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.dry
    dev = "cuda" if cuda else "cpu"
    vocab = AutoConfig.from_pretrained(a.model).get_text_config().vocab_size
    tok = AutoTokenizer.from_pretrained(a.model)
    raw = {"model": {"name_or_path": a.model}, "method": a.method,
           "lora": {"r": 64, "alpha": 16, "target_modules": TARGETS},
           # kernels off: liger's fused loss reads a count back to the CPU (.item()), which a graph cannot hold
           "training": {"gradient_checkpointing": False, "kernels": "off", "device": dev}}
    if a.method == "qlora":
        raw["quantization"] = {"bits": 4}
    cfg = resolve_lib.resolve(config_lib.from_dict(raw))
    model = model_lib.load_for_training(cfg, tok, [])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lr = torch.tensor(2e-4, device=dev) if cuda else 2e-4  # a tensor LR is what a captured AdamW step reads
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)  # as core.train.build_trainer
    opt = torch.optim.AdamW(params, lr=lr, fused=cuda, capturable=cuda)
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda, cache_enabled=False)  # no cast cache in graphs
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = 3 + a.steps
    free = batches(a.tokens, vocab, a.mb, 0, n, tok)
    bucketed = batches(a.tokens, vocab, a.mb, a.bucket, n, tok)

    def to_dev(b):
        return {"input_ids": b["input_ids"].to(dev), "labels": b["labels"].to(dev),
                "position_ids": b["position_ids"].to(dev), "attention_mask": block_causal(b["doc"], dev)}

    def step(inp):
        with amp:
            loss = model(**inp, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # grads stay put: the graph holds their addresses
        return loss.detach()

    def timed(name, bs, fn):
        for b in bs[:3]:
            fn(b)
        sync()
        t = time.perf_counter()
        losses = [fn(b) for b in bs[3:]]
        sync()
        dt = time.perf_counter() - t
        real = sum(b["real"] for b in bs[3:])
        rowlen = sum(b["input_ids"].shape[1] for b in bs[3:]) / len(bs[3:])
        r = {"run": name, "non_pad_tokens_per_s": round(real / dt, 1), "step_s": round(dt / len(bs[3:]), 4),
             "real_tokens_per_step": round(real / len(bs[3:]), 1), "row_tokens": round(rowlen, 1),
             "losses": [round(float(x), 5) for x in losses]}
        print(json.dumps(r), flush=True)
        return r

    # SDPA takes the block mask as-is (a 4-D mask skips transformers' packed-sequence detection,
    # which reads a value back to the CPU)
    results = [timed("eager, padding-free rows", free, lambda b: step(to_dev(b)))]
    # the graph replays the bucketed run from the same weights and optimizer state: same losses
    state = [t for p in params for t in [p, *opt.state[p].values()] if torch.is_tensor(t)]
    snapshot = [t.detach().clone() for t in state]

    def restore():
        with torch.no_grad():
            for t, v in zip(state, snapshot):
                t.copy_(v)  # in place: the graph holds these addresses

    results.append(timed(f"eager, rows padded to {a.bucket}", bucketed, lambda b: step(to_dev(b))))
    if cuda:
        static = to_dev(bucketed[0])
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graph asks
            for _ in range(3):
                step(static)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        t0 = time.perf_counter()
        with torch.cuda.graph(g):
            static_loss = step(static)
        sync()
        capture_s = time.perf_counter() - t0

        def replay(b):
            for k, v in to_dev(b).items():
                static[k].copy_(v)
            g.replay()
            return static_loss.clone()

        restore()
        r = timed(f"CUDA graph, rows of {a.bucket}", bucketed, replay)
        r["capture_s"] = round(capture_s, 2)
        eager = results[1]["losses"]
        r["max_rel_loss_diff_vs_eager"] = max(abs(x - y) / abs(y) for x, y in zip(r["losses"], eager))
        results.append(r)
        print(f"graph vs eager (same batches, same start): max relative loss difference "
              f"{r['max_rel_loss_diff_vs_eager']:.2e}", flush=True)
        print(f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, "
              f"{torch.cuda.get_device_name(0)}", flush=True)
    else:  # dry run: the restore gives the same losses again (what the graph comparison relies on)
        restore()
        again = timed("eager again from the snapshot (dry check)", bucketed, lambda b: step(to_dev(b)))
        assert again["losses"] == results[1]["losses"], (again["losses"], results[1]["losses"])
    if a.out:
        with open(a.out, "a") as f:
            for r in results:
                f.write(json.dumps({**r, "model": Path(a.model).name, "method": a.method, "bucket": a.bucket}) + "\n")


if __name__ == "__main__":
    main()
