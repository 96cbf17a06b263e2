"""One autograd node per LoRA layer: y = x W^T (+ bias) + s * (x A^T) B^T.

Under PEFT a LoRA layer is ~8 autograd nodes and ~12 kernel launches per step (the base matmul,
bitsandbytes' defensive clone, autocast casts of A and B, two matmuls, the scaling multiply, the
add) and a QLoRA step of an 8B model is bound by that CPU work, not by the GPU
(docs/BENCHMARKS.md). Here the forward is two matmuls and an addmm with the scaling folded in, the
backward recomputes the frozen weight (4-bit: dequantized again, as bitsandbytes does) and
returns fp32 gradients for the fp32 adapter weights. Same maths as PEFT's vanilla LoRA (no
dropout, no DoRA): tests/test_fastpath.py compares outputs and gradients.

Used only while training, with one active adapter, no dropout and a frozen base weight; anything
else (chat's disable_adapter(), merged weights, several adapters) takes PEFT's own forward."""

from __future__ import annotations

import types

import torch


def _frozen_weight(base, dtype):
    """The base layer's weight in the compute dtype: bitsandbytes 4-bit weights dequantized."""
    w = base.weight
    if getattr(w, "quant_state", None) is not None:  # bnb.nn.Params4bit
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(w.data, w.quant_state)
    return w if w.dtype == dtype else w.to(dtype)


class LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, base, scaling, dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        a16, b16 = A.to(dtype), B.to(dtype)
        bias = base.bias.to(dtype) if base.bias is not None else None
        xa = x2 @ a16.t()  # tokens x r
        y = torch.nn.functional.linear(x2, _frozen_weight(base, dtype), bias)
        y.addmm_(xa, b16.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, a16, b16)
        ctx.base, ctx.scaling, ctx.dtype, ctx.shape = base, scaling, dtype, shape
        ctx.dtypes = x.dtype, A.dtype, B.dtype
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, xa, a16, b16 = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).to(ctx.dtype)
        s = ctx.scaling
        grad_B = (g2.t() @ xa).mul_(s)  # out x r
        gxa = (g2 @ b16).mul_(s)  # tokens x r
        grad_A = gxa.t() @ x2  # r x in
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g2 @ _frozen_weight(ctx.base, ctx.dtype)
            grad_x.addmm_(gxa, a16)
            grad_x = grad_x.reshape(ctx.shape).to(ctx.dtypes[0])
        return grad_x, grad_A.to(ctx.dtypes[1]), grad_B.to(ctx.dtypes[2]), None, None, None


def _fused_forward(self, x, *args, **kwargs):
    """PEFT LoraLayer.forward, fused when the layer is in the plain training case."""
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    base = self.get_base_layer()
    if (args or kwargs or not self.training or self.disable_adapters or self.merged or name not in self.lora_A
            or name in getattr(self, "lora_variant", {}) or not isinstance(self.lora_dropout[name], torch.nn.Identity)
            or base.weight.requires_grad):  # a trained base weight: its gradient is PEFT's business
        return type(self).forward(self, x, *args, **kwargs)
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    return LoRALinear.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, base, self.scaling[name], dtype)


def install(model) -> int:
    """Route the forward of every plain LoRA linear layer (nn.Linear or bitsandbytes 4-bit base)
    through LoRALinear. Returns how many layers it covers."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for m in model.modules():
        if not isinstance(m, LoraLayer) or not hasattr(m, "lora_A"):
            continue
        base = m.get_base_layer()
        four_bit = getattr(getattr(base, "weight", None), "quant_state", None) is not None
        if type(base) is not torch.nn.Linear and not four_bit:
            continue  # 8-bit, conv, embedding...: PEFT's forward
        m.forward = types.MethodType(_fused_forward, m)
        n += 1
    return n
