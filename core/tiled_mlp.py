"""Sequence-tiled MLP for long rows (training.tiled_mlp): the MLP of each decoder layer runs over
tiles of the row, so its intermediates (gate, up, their product: 3 x intermediate_size values a
token, ~10 GiB each for 348k tokens of an 8B model) exist one tile at a time.

The algorithm of DeepSpeed's TiledMLP (ALST, arXiv 2506.13996), also in liger-kernel
(LigerTiledMLPFunction). Written out here because the CPU install has neither (liger's module
imports Triton) and the tests must run its maths on CPU: the forward keeps only its input; the
backward recomputes each tile with grad on and back-propagates it, so the adapter gradients add
up tile by tile and the input gradient is written tile by tile. Same results as the plain MLP:
tests/test_fastpath.py. Under reentrant checkpointing (offloaded activations) the layer's
recompute runs this forward again, still one tile at a time. Recomputed tiles would draw new
dropout masks, so it needs LoRA dropout 0 (the default; config.resolve refuses otherwise)."""

from __future__ import annotations

import types

import torch


class TiledMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, x, tile, *params):
        # params: the trainable tensors fn reads; listed so autograd knows this node depends on them
        ctx.fn, ctx.tile = fn, tile
        # the backward's recompute runs outside the forward's autocast: take its state along (as
        # torch.utils.checkpoint does), or the recomputed tiles would run in another dtype
        dev = x.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([fn(t) for t in x.split(tile, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        dev, enabled, dtype = ctx.autocast
        x_grad = torch.zeros_like(x) if ctx.needs_input_grad[1] else None
        for i, (xt, gt) in enumerate(zip(x.split(ctx.tile, dim=-2), grad.split(ctx.tile, dim=-2))):
            xt = xt.detach().requires_grad_(x_grad is not None)
            with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                out = ctx.fn(xt)
            torch.autograd.backward(out, gt)  # adapter gradients accumulate in their .grad
            if x_grad is not None:
                x_grad.narrow(-2, i * ctx.tile, xt.shape[-2]).copy_(xt.grad)
        return (None, x_grad, None) + (None,) * len(ctx.needs_input_grad[3:])


def _tiled_forward(self, x, *args, **kwargs):
    fn = self._untiled_forward
    if args or kwargs or x.shape[-2] <= self._tile_tokens:
        return fn(x, *args, **kwargs)
    if not torch.is_grad_enabled():  # eval, or a reentrant checkpoint's first pass: no graph to keep
        return torch.cat([fn(t) for t in x.split(self._tile_tokens, dim=-2)], dim=-2)
    params = [p for p in self.parameters() if p.requires_grad]
    return TiledMLPFunction.apply(fn, x, self._tile_tokens, *params)


_tiled_forward.lorastudio_wrapper = True


def install(model, tile_tokens: int) -> int:
    """Tile the forward of every gated MLP (gate_proj/up_proj/down_proj: Llama, Qwen, Mistral,
    Gemma...) over rows longer than tile_tokens. Returns how many MLPs it covers."""
    n = 0
    for name, m in model.named_modules():
        if name.split(".")[-1] == "mlp" and all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj")):
            m._untiled_forward = m.forward
            m._tile_tokens = tile_tokens
            m.forward = types.MethodType(_tiled_forward, m)
            n += 1
    return n


def reinstall(model) -> int:
    """Put the tiles back on the MLPs that had them, where something rebound their forward since
    (liger-kernel binds its SwiGLU forward to each MLP when the Trainer's train() starts, which
    drops the tiled one): the rebound forward goes under the tiles. Returns how many."""
    n = 0
    for m in model.modules():
        # still under a wrapper of ours (this one, core.fused_lora's MLP recompute): nothing rebound it
        if hasattr(m, "_tile_tokens") and not getattr(getattr(m.forward, "__func__", None), "lorastudio_wrapper", False):
            m._untiled_forward = m.forward
            m.forward = types.MethodType(_tiled_forward, m)
            n += 1
    return n
