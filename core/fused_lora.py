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
    qs = getattr(w, "quant_state", None)
    if qs is not None:  # bnb.nn.Params4bit
        out = _dequantize_direct(w.data, qs) if w.is_cuda else None
        if out is None:
            import bitsandbytes.functional as bnbf

            out = bnbf.dequantize_4bit(w.data, qs)
        w = out
    return w if w.dtype == dtype else w.to(dtype)


_DIRECT = []  # [bitsandbytes' CUDA kernels' Python entry points] once found; [None] where not


def _dequantize_direct(packed, qs):
    """bitsandbytes.functional.dequantize_4bit on CUDA through the same two kernels, called the
    way bitsandbytes' CUDA backend calls them, without its two torch.library custom-op
    dispatches and argument checks: ~100 us of CPU a weight (torch profiler, 8B QLoRA, H200),
    ~500 dequantisations a step, and the step is CPU-bound. Bit-identical output
    (bench/mlp_check.py compares them on the device). None where the backend's entry points are
    not there (another bitsandbytes version) or the state is not the plain NF4/FP4 case."""
    if not _DIRECT:
        try:
            from bitsandbytes.backends.cuda import ops

            _DIRECT.append((ops._dequantize_blockwise_impl, ops._dequantize_4bit_impl))
        except (ImportError, AttributeError):
            _DIRECT.append(None)
    impl = _DIRECT[0]
    if impl is None or packed.shape[0] == 1 or qs.quant_type not in ("nf4", "fp4"):
        return None  # (the transposed legacy layout: bitsandbytes' own path)
    blockwise, four_bit = impl
    absmax = qs.absmax
    if qs.nested:
        s2 = qs.state2
        nested = torch.empty(absmax.shape, dtype=s2.dtype, device=absmax.device)
        blockwise(absmax, s2.absmax, s2.code.to(absmax.device), s2.blocksize, s2.dtype, out=nested)
        absmax = nested.add_(qs.offset)
        if absmax.dtype != torch.float32:
            absmax = absmax.float()
    out = torch.empty(qs.shape, dtype=qs.dtype, device=packed.device)
    four_bit(packed, absmax, qs.blocksize, qs.quant_type, qs.dtype, out=out)
    return out


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


# ---------------------------------------------------------------- the MLP that recomputes in backward

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _plain_part(layer):
    """(base layer, A, B, scaling) of one MLP projection in the plain training case: a LoRA layer
    _fused_forward would fuse, or a frozen base layer (A, B None); None for anything else."""
    from peft.tuners.lora import LoraLayer

    if isinstance(layer, LoraLayer) and hasattr(layer, "lora_A"):
        adapters = layer.active_adapters
        name = adapters[0] if len(adapters) == 1 else None
        base = layer.get_base_layer()
        if (not layer.training or layer.disable_adapters or layer.merged or name not in layer.lora_A
                or name in getattr(layer, "lora_variant", {}) or not isinstance(layer.lora_dropout[name], torch.nn.Identity)):
            return None
        part = (base, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
    else:
        base = layer
        part = (base, None, None, 1.0)
    w = getattr(base, "weight", None)
    four_bit = getattr(w, "quant_state", None) is not None
    if w is None or w.requires_grad or (type(base) is not torch.nn.Linear and not four_bit):
        return None
    return part


def _project(x2, base, w16, scaling, dtype, xa=None):
    """x2 W^T (+ bias) + s (x2 A^T) B^T, as LoRALinear.forward computes it; xa: x2 A^T if known."""
    bias = base.bias.to(dtype) if base.bias is not None else None
    y = torch.nn.functional.linear(x2, _frozen_weight(base, dtype), bias)
    if w16 is not None:
        a16, b16 = w16
        if xa is None:
            xa = x2 @ a16.t()
        y.addmm_(xa, b16.t(), alpha=scaling)
    return y, xa


def _project_backward(g2, x2, base, w16, scaling, xa, dtype, need_input: bool):
    """LoRALinear.backward's sums, in its order: (grad of the input, grad A, grad B)."""
    grad_a = grad_b = None
    gxa = None
    if w16 is not None:
        a16, b16 = w16
        grad_b = (g2.t() @ xa).mul_(scaling)
        gxa = (g2 @ b16).mul_(scaling)
        grad_a = gxa.t() @ x2
    grad_x = None
    if need_input:
        grad_x = g2 @ _frozen_weight(base, dtype)
        if gxa is not None:
            grad_x.addmm_(gxa, w16[0])
    return grad_x, grad_a, grad_b


class _MLPMeta:
    __slots__ = ("bases", "scalings", "act_mul", "dtype")

    def __init__(self, bases, scalings, act_mul, dtype):
        self.bases, self.scalings, self.act_mul, self.dtype = bases, scalings, act_mul, dtype


class LoRAMLP(torch.autograd.Function):
    """down(act(gate(x)) * up(x)) with LoRA on any of the three, as one autograd node that keeps
    only x (and the rank-r products x A^T) for backward: gate(x) and up(x) are computed again there
    (the frozen weights dequantised again, as LoRALinear's backward does anyway). The plain path
    keeps gate, up and their product (3 x the MLP width a token, ~56% of a layer's activations on
    the 8B); this one costs a second gate/up matmul on the GPU and no Python beyond this node.
    Each sum is LoRALinear's, in its order; the activation's product is the plain MLP's own
    (liger's SiLU-mul kernel where liger patched the MLP)."""

    @staticmethod
    def forward(ctx, x, meta, *ab):
        shape, dtype = x.shape, meta.dtype
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        w16 = [None if ab[2 * i] is None else (ab[2 * i].to(dtype), ab[2 * i + 1].to(dtype)) for i in range(3)]
        (bg, bu, bd), (sg, su, sd) = meta.bases, meta.scalings
        g, xa_g = _project(x2, bg, w16[0], sg, dtype)
        u, xa_u = _project(x2, bu, w16[1], su, dtype)
        h = meta.act_mul(g, u)
        del g, u
        y, xa_d = _project(h, bd, w16[2], sd, dtype)
        flat = [t for w in w16 for t in (w if w is not None else (None, None))]
        ctx.save_for_backward(x2, xa_g, xa_u, xa_d, *flat)
        ctx.meta, ctx.shape, ctx.dtypes = meta, shape, (x.dtype, [None if t is None else t.dtype for t in ab])
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, xa_g, xa_u, xa_d, *flat = ctx.saved_tensors
        meta, dtype = ctx.meta, ctx.meta.dtype
        w16 = [None if flat[2 * i] is None else (flat[2 * i], flat[2 * i + 1]) for i in range(3)]
        (bg, bu, bd), (sg, su, sd) = meta.bases, meta.scalings
        gy2 = gy.reshape(-1, gy.shape[-1]).to(dtype)
        g, _ = _project(x2, bg, w16[0], sg, dtype, xa_g)  # the forward's values again
        u, _ = _project(x2, bu, w16[1], su, dtype, xa_u)
        with torch.enable_grad():
            g.requires_grad_(True)
            u.requires_grad_(True)
            h = meta.act_mul(g, u)
        grad_h, grad_ad, grad_bd = _project_backward(gy2, h.detach(), bd, w16[2], sd, xa_d, dtype, True)
        grad_g, grad_u = torch.autograd.grad(h, (g, u), grad_h)
        del h, grad_h, g, u
        need_x = ctx.needs_input_grad[0]
        gx_g, grad_ag, grad_bg = _project_backward(grad_g, x2, bg, w16[0], sg, xa_g, dtype, need_x)
        del grad_g
        gx_u, grad_au, grad_bu = _project_backward(grad_u, x2, bu, w16[1], su, xa_u, dtype, need_x)
        grad_x = None
        if need_x:  # autograd's sum of the two input gradients, in the input's dtype
            x_dtype = ctx.dtypes[0]
            grad_x = (gx_g.to(x_dtype) + gx_u.to(x_dtype)).reshape(ctx.shape)
        grads = [grad_ag, grad_bg, grad_au, grad_bu, grad_ad, grad_bd]
        out = [None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes[1])]
        return (grad_x, None, *out)


def _act_mul(mlp):
    """act(gate) * up as the MLP's own forward computes it: liger's SiLU-mul where liger bound
    its SwiGLU forward, else the module's act_fn; None when neither is known."""
    from . import tiled_mlp

    inner = mlp.__dict__.get("_mlp_inner_forward") or mlp.forward
    if getattr(inner, "__func__", None) is tiled_mlp._tiled_forward:
        inner = mlp._untiled_forward
    if "LigerSwiGLUMLP" in getattr(getattr(inner, "__func__", None), "__qualname__", ""):
        try:
            from liger_kernel.transformers.swiglu import _swiglu_dispatch as silu_mul  # its own call, by version
        except ImportError:
            try:
                from liger_kernel.ops import LigerSiLUMulFunction
            except ImportError:
                return None
            silu_mul = LigerSiLUMulFunction.apply
        return silu_mul
    act = getattr(mlp, "act_fn", None)
    return None if act is None else (lambda g, u: act(g) * u)


def _recompute_forward(self, x, *args, **kwargs):
    inner = self._mlp_inner_forward
    tile = getattr(self, "_tile_tokens", None)
    if (not self.recompute_mlp or args or kwargs or not self.training or not torch.is_grad_enabled()
            or (tile is not None and x.shape[-2] > tile)):  # long rows: the tiled MLP saves more
        return inner(x, *args, **kwargs)
    parts = [_plain_part(getattr(self, n)) for n in MLP_PROJECTIONS]
    act_mul = self._mlp_act_mul
    if any(p is None for p in parts) or act_mul is None:
        return inner(x)
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    meta = _MLPMeta([p[0] for p in parts], [p[3] for p in parts], act_mul, dtype)
    return LoRAMLP.apply(x, meta, *[t for p in parts for t in (p[1], p[2])])


_recompute_forward.lorastudio_wrapper = True  # (core.tiled_mlp.reinstall leaves it on top)


def install_mlp(model) -> list:
    """Route every gated decoder MLP (gate_proj/up_proj/down_proj) through LoRAMLP while its
    `recompute_mlp` flag is set (False here; core.model and the trainer set it per layer).
    Idempotent, and to be called again after liger-kernel rebinds the MLPs' forward (the
    Trainer applies liger inside train()): the wrapper goes back on top. Returns the MLPs in order."""
    out = []
    for name, m in model.named_modules():
        if name.split(".")[-1] != "mlp" or not all(hasattr(m, p) for p in MLP_PROJECTIONS):
            continue
        if getattr(m.forward, "__func__", None) is not _recompute_forward:
            m._mlp_inner_forward = m.forward
            m.forward = types.MethodType(_recompute_forward, m)
        m._mlp_act_mul = _act_mul(m)
        if not hasattr(m, "recompute_mlp"):
            m.recompute_mlp = False
        out.append(m)
    return out


def set_mlp_recompute(mlps: list, n: int) -> None:
    """The last n of these MLPs (in layer order) recompute; the others run as before."""
    first = len(mlps) - max(0, min(n, len(mlps)))
    for i, m in enumerate(mlps):
        m.recompute_mlp = i >= first


def rewrap(model) -> None:
    """After liger-kernel rebound the MLPs' forward (Trainer.train applies it): the tiled MLP
    (core.tiled_mlp) and the recompute wrapper back on top, in that order."""
    from . import tiled_mlp

    tiled_mlp.reinstall(model)
    if any(hasattr(m, "recompute_mlp") for m in model.modules()):
        install_mlp(model)
