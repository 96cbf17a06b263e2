"""The memory plan of a CUDA training run: the worst and the typical micro-batch in tokens, the
budget (training.gpu_memory_gib or the free memory), and the auto memory settings core.resolve.plan
fills for them. Called by the training child (core.train) and bench/speed.py."""

from __future__ import annotations


def memory_plan(cfg, lengths: list[int]) -> tuple[dict, list[str], float]:
    """Fill the auto memory settings of a CUDA run in place (core.resolve.plan, stage 3) and cap
    torch's allocator at training.gpu_memory_gib when set. The worst micro-batch in tokens:
    packed rows are full; padding-free rows hold the mb longest samples; padded rows are mb x
    the longest. Returns (the decided fields, reasons, the budget in GiB)."""
    import torch

    from . import arch as arch_lib
    from . import resolve

    t = cfg.training
    mb = t.micro_batch_size * (2 if cfg.stage in ("dpo", "orpo", "simpo") else 1)  # a pair: both answers
    longest = sorted(lengths, reverse=True)
    pad = pad_multiple(cfg)
    up = lambda n: -(-n // pad) * pad  # noqa: E731 - rows are padded up to a multiple of pad
    if cfg.template.packing:
        max_tokens = up(cfg.template.cutoff_len * mb)
    elif cfg.template.padding_free:
        max_tokens = up(sum(longest[:mb]))
    else:
        max_tokens = up(longest[0] if longest else cfg.template.cutoff_len) * mb
    # a typical micro-batch: mb rows of the median length (what most steps hold)
    median = longest[len(longest) // 2] if longest else cfg.template.cutoff_len
    typical = max_tokens if cfg.template.packing else min(max_tokens, up(median * mb))
    free, total = torch.cuda.mem_get_info()
    budget = free / 2 ** 30
    reasons = []
    if t.gpu_memory_gib:
        budget = min(budget, t.gpu_memory_gib)
        # the allocator's cap (the CUDA context and managed memory come on top: the plan counts them)
        torch.cuda.set_per_process_memory_fraction(min(1.0, t.gpu_memory_gib * 2 ** 30 / total))
        reasons.append(f"budget {t.gpu_memory_gib:g} GiB (training.gpu_memory_gib)")
    # multi-GPU: every rank must make the same choice (an optimizer per rank that differs would
    # split the replicas) and free memory differs by rank: the safe static settings, those the
    # plan gives an unknown architecture
    arch = None
    if t.gpus == 1:
        try:
            arch = arch_lib.arch_for(cfg.model.name_or_path)
        except Exception:  # noqa: BLE001 - an unknown architecture keeps the safe settings
            pass
    decided, why = resolve.plan(cfg, arch, max_tokens, budget, typical_tokens=typical)
    resolve.fill(cfg, decided)
    if t.gpus > 1:
        why = ["multi-GPU: checkpointing on, fused AdamW, embeddings and activations on the GPU unless set"]
    return decided, reasons + why, budget


def pad_multiple(cfg) -> int:
    pad = cfg.template.pad_to_multiple_of
    return pad if isinstance(pad, int) else 1  # "auto" unresolved (a caller of build_trainer alone): none
