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
from torch.optim.optimizer import register_optimizer_step_post_hook


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


_STEPS = [0]  # optimizer steps taken in this process (the hook below): the adapter weights' clock


def _count_step(optimizer, args, kwargs) -> None:
    _STEPS[0] += 1


# Every optimizer's step (torch's own and bitsandbytes', whose CUDA kernels update the weights in
# place without bumping their version counters) tells the weight cache below that A and B changed.
register_optimizer_step_post_hook(_count_step)


def compute_weights(owner, A, B, scaling: float, dtype):
    """(s * A, B) in the compute dtype, made once per optimizer step and shared by every forward,
    checkpointing's recompute and the backward until the next step: per layer call two casts and
    two scalings fewer (the step is CPU-bound: ~10 kernel launches a LoRA layer instead of ~16).
    Kept on `owner` (the LoRA layer or MLP); stale after an optimizer step, an in-place change of
    A or B (their version counters) or a new tensor. Costs 2 bytes a LoRA parameter of memory the
    old path held only while a layer's saved tensors lived (core.memory counts it)."""
    key = (_STEPS[0], A._version, B._version, A.data_ptr(), B.data_ptr(), dtype, scaling)
    cached = owner.__dict__.get("_lorastudio_w16")
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        w = ((A * scaling).to(dtype), B.to(dtype))
    owner.__dict__["_lorastudio_w16"] = (key, w)
    return w


def drop_compute_weights(model) -> None:
    """Free the cached copies (after training, before a merge or chat in the same process)."""
    for m in model.modules():
        m.__dict__.pop("_lorastudio_w16", None)


class LoRALinear(torch.autograd.Function):
    """y = x W^T + (x (sA)^T) B^T with sA and B the step's compute-dtype copies (compute_weights):
    grad B = g^T (x (sA)^T), grad A = s (g B)^T x, grad x = g W + (g B)(sA)."""

    @staticmethod
    def forward(ctx, x, A, B, base, scaling, dtype, w16):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        a16s, b16 = w16
        bias = base.bias.to(dtype) if base.bias is not None else None
        xas = x2 @ a16s.t()  # tokens x r, scaled
        y = torch.nn.functional.linear(x2, _frozen_weight(base, dtype), bias)
        y.addmm_(xas, b16.t())
        ctx.save_for_backward(x2, xas, a16s, b16)
        ctx.base, ctx.scaling, ctx.dtype, ctx.shape = base, scaling, dtype, shape
        ctx.dtypes = x.dtype, A.dtype, B.dtype
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, xas, a16s, b16 = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).to(ctx.dtype)
        grad_x, grad_a, grad_b = _project_backward(g2, x2, ctx.base, (a16s, b16), ctx.scaling, xas, ctx.dtype,
                                                   ctx.needs_input_grad[0], ctx.dtypes[1:])
        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.shape).to(ctx.dtypes[0])
        return grad_x, grad_a, grad_b, None, None, None, None


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
    A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
    return LoRALinear.apply(x, A, B, base, s, dtype, compute_weights(self, A, B, s, dtype))


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
    """(base layer, A, B, scaling, the layer) of one MLP projection in the plain training case: a
    LoRA layer _fused_forward would fuse, or a frozen base layer (A, B None); None for anything else."""
    from peft.tuners.lora import LoraLayer

    if isinstance(layer, LoraLayer) and hasattr(layer, "lora_A"):
        adapters = layer.active_adapters
        name = adapters[0] if len(adapters) == 1 else None
        base = layer.get_base_layer()
        if (not layer.training or layer.disable_adapters or layer.merged or name not in layer.lora_A
                or name in getattr(layer, "lora_variant", {}) or not isinstance(layer.lora_dropout[name], torch.nn.Identity)):
            return None
        part = (base, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name], layer)
    else:
        base = layer
        part = (base, None, None, 1.0, layer)
    w = getattr(base, "weight", None)
    four_bit = getattr(w, "quant_state", None) is not None
    if w is None or w.requires_grad or (type(base) is not torch.nn.Linear and not four_bit):
        return None
    return part


def _project(x2, base, w16, dtype, xas=None):
    """x2 W^T (+ bias) + (x2 (sA)^T) B^T, as LoRALinear.forward computes it; w16: (sA, B) in the
    compute dtype (compute_weights); xas: x2 (sA)^T if known."""
    bias = base.bias.to(dtype) if base.bias is not None else None
    y = torch.nn.functional.linear(x2, _frozen_weight(base, dtype), bias)
    if w16 is not None:
        a16s, b16 = w16
        if xas is None:
            xas = x2 @ a16s.t()
        y.addmm_(xas, b16.t())
    return y, xas


def _project_backward(g2, x2, base, w16, scaling, xas, dtype, need_input: bool, grad_dtypes=(None, None)):
    """LoRALinear.backward's sums: (grad of the input, grad A, grad B), the adapter gradients in
    grad_dtypes (the fp32 adapter weights' own: the scaling and the cast are one kernel for A)."""
    grad_a = grad_b = None
    gxa = None
    if w16 is not None:
        a16s, b16 = w16
        grad_b = g2.t() @ xas  # out x r: s is already in xas
        gxa = g2 @ b16  # tokens x r, unscaled
        grad_a = gxa.t() @ x2
        da, db = grad_dtypes
        grad_a = torch.mul(grad_a, scaling, out=torch.empty(grad_a.shape, dtype=da or grad_a.dtype,
                                                            device=grad_a.device))
        if db is not None and grad_b.dtype != db:
            grad_b = grad_b.to(db)
    grad_x = None
    if need_input:
        grad_x = g2 @ _frozen_weight(base, dtype)
        if gxa is not None:
            grad_x.addmm_(gxa, w16[0])  # (g B)(sA)
    return grad_x, grad_a, grad_b


class _MLPMeta:
    __slots__ = ("bases", "scalings", "act_mul", "dtype", "w16")

    def __init__(self, bases, scalings, act_mul, dtype, w16):
        self.bases, self.scalings, self.act_mul, self.dtype = bases, scalings, act_mul, dtype
        self.w16 = w16  # per projection (sA, B) in the compute dtype (compute_weights) or None


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
        w16 = meta.w16
        bg, bu, bd = meta.bases
        g, xa_g = _project(x2, bg, w16[0], dtype)
        u, xa_u = _project(x2, bu, w16[1], dtype)
        h = meta.act_mul(g, u)
        del g, u
        y, xa_d = _project(h, bd, w16[2], dtype)
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
        g, _ = _project(x2, bg, w16[0], dtype, xa_g)  # the forward's values again
        u, _ = _project(x2, bu, w16[1], dtype, xa_u)
        with torch.enable_grad():
            g.requires_grad_(True)
            u.requires_grad_(True)
            h = meta.act_mul(g, u)
        gd = ctx.dtypes[1]
        grad_h, grad_ad, grad_bd = _project_backward(gy2, h.detach(), bd, w16[2], sd, xa_d, dtype, True, gd[4:6])
        grad_g, grad_u = torch.autograd.grad(h, (g, u), grad_h)
        del h, grad_h, g, u
        need_x = ctx.needs_input_grad[0]
        gx_g, grad_ag, grad_bg = _project_backward(grad_g, x2, bg, w16[0], sg, xa_g, dtype, need_x, gd[0:2])
        del grad_g
        gx_u, grad_au, grad_bu = _project_backward(grad_u, x2, bu, w16[1], su, xa_u, dtype, need_x, gd[2:4])
        grad_x = None
        if need_x:  # autograd's sum of the two input gradients, in the input's dtype
            x_dtype = ctx.dtypes[0]
            grad_x = (gx_g.to(x_dtype) + gx_u.to(x_dtype)).reshape(ctx.shape)
        return (grad_x, None, grad_ag, grad_bg, grad_au, grad_bu, grad_ad, grad_bd)


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
    w16 = [None if p[1] is None else compute_weights(p[4], p[1], p[2], p[3], dtype) for p in parts]
    meta = _MLPMeta([p[0] for p in parts], [p[3] for p in parts], act_mul, dtype, w16)
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
