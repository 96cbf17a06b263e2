"""bitsandbytes' 8-bit AdamW without a device sync after every tensor.

bitsandbytes 0.50's Optimizer8bit.step calls torch.cuda.synchronize() after each parameter's
update (bitsandbytes PR #2050 removes it for non-paged CUDA state). A LoRA of an 8B model has
448 tensors, so every optimizer step stalls the CPU 448 times and nothing of the next step can
be queued behind it: on a CPU-bound step that is most of what the memory plan's 8-bit optimizer
cost (0.58 vs 0.38 s a step against fused AdamW, 8B QLoRA, H200). Here the same kernels update
the same state in the same order; each update is queued on the stream bitsandbytes always
launches on (the legacy default stream, which is torch's current stream in a training process
that never switches streams; otherwise bitsandbytes' own step runs), and a paged optimizer
syncs once at the end, as bitsandbytes does after its loop. On CUDA the update goes straight to
bitsandbytes' CUDA entry point, without its torch.library custom-op dispatch (~100 us of CPU
each, the same finding as core.fused_lora's dequantisation). state_dict, resume and the
optimizer's numbers are bitsandbytes' own: tests/test_optim.py compares them on CPU,
bench/optim_check.py bit for bit on CUDA."""

from __future__ import annotations

import torch

_DIRECT = []  # [bitsandbytes' CUDA 8-bit blockwise update] once looked up; [None] where absent


def _direct():
    if not _DIRECT:
        try:
            from bitsandbytes.backends.cuda import ops

            _DIRECT.append(ops._optimizer_update_8bit_blockwise_impl)
        except (ImportError, AttributeError, RuntimeError):
            _DIRECT.append(None)
    return _DIRECT[0]


class _NoSyncSteps:
    """Mixed in before a bitsandbytes Optimizer2State class (AdamW and its paged variant)."""

    @torch.no_grad()
    def step(self, closure=None):
        if torch.cuda.is_available() and torch.cuda.current_stream() != torch.cuda.default_stream():
            return super().step(closure)  # (its kernels run on the default stream: keep its syncs)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        last = None
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
                last = p
        if self.is_paged and last is not None and last.is_cuda:
            torch.cuda.synchronize()  # managed memory: bitsandbytes' one sync after its loop
        return loss

    def update_step(self, group, p, gindex, pindex):
        state = self.state[p]
        impl = _direct() if p.is_cuda else None
        if (impl is None or state["state1"].dtype != torch.uint8 or not p.is_contiguous()
                or not p.grad.is_contiguous()):
            return super().update_step(group, p, gindex, pindex)
        c = self.get_config(gindex, pindex, group)
        state["step"] += 1
        betas = c["betas"]
        impl(self.optimizer_name, p.grad, p, state["state1"], state["state2"], betas[0], betas[1],
             betas[2] if len(betas) >= 3 else 0.0, c.get("alpha", 0.0), c["eps"], state["step"], c["lr"],
             state["qmap1"], state["qmap2"], state["absmax1"], state["absmax2"], c["weight_decay"], 1.0,
             c["skip_zeros"])


def without_syncs(cls):
    """cls with the step above when it is bitsandbytes' 8-bit-capable AdamW family (what the
    Trainer builds for adamw_bnb_8bit / adamw_8bit / paged_adamw_8bit); any other class as it is."""
    try:
        from bitsandbytes.optim.optimizer import Optimizer2State
    except ImportError:
        return cls
    if not (isinstance(cls, type) and issubclass(cls, Optimizer2State)) or issubclass(cls, _NoSyncSteps):
        return cls
    return type(cls.__name__, (_NoSyncSteps, cls), {"__module__": __name__,
                                                    "__doc__": f"{cls.__doc__ or ''}\n(core.optim: no per-tensor sync)"})
