"""The Trainer the spine builds: the stock HF Trainer minus per-step bookkeeping that costs more
than it says, saved activations offloaded to CPU RAM, and liger-kernel's settings."""

from __future__ import annotations

import collections


def trainer_class(offload_activations: bool):
    from transformers import Trainer

    class LeanTrainer(Trainer):
        """The stock Trainer minus its per-step bookkeeping that costs more than it says. A LoRA
        step on an 8B model is CPU-bound (docs/BENCHMARKS.md), and every step the stock loop walks
        all ~2,700 modules three or four times (model.train(), num_parameters() for the FLOPs
        count, model.zero_grad(), clip over model.parameters()) and syncs with the GPU to count
        tokens. Same numbers, same order of operations; one process only for the cached
        parameter list (FSDP and DeepSpeed replace parameters when they wrap the model)."""

        _n_params = None  # for floating_point_ops: constant during training
        _layers_for = None  # training.checkpoint_per_batch: tokens -> checkpointed layers
        _trainable = None  # trainable parameters, cached at the first step; False: not used

        def _lean_params(self, model):
            if self._trainable is None:
                single = self.args.world_size == 1 and not self.is_deepspeed_enabled and not self.is_fsdp_enabled
                self._trainable = [p for p in model.parameters() if p.requires_grad] if single else False
                if self._trainable:  # Trainer calls model.zero_grad() after each optimizer step
                    params = self._trainable

                    def zero_grad(set_to_none: bool = True):
                        for p in params:
                            if set_to_none:
                                p.grad = None
                            elif p.grad is not None:
                                p.grad.zero_()

                    model.__dict__["zero_grad"] = zero_grad
            return self._trainable

        def checkpoint_by_batch(self, layers_for):
            """Before each step, checkpoint the first layers_for(tokens of the batch) decoder
            layers and run the others plainly (transformers reads each layer's flag per call)."""
            from transformers.modeling_layers import GradientCheckpointingLayer

            self._ckpt = [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer)]
            self._layers_for, self.checkpointed = layers_for, collections.Counter()
            # layers_for.mlp (training.mlp_recompute): the MLPs that recompute, the last ones
            self._mlp_for = getattr(layers_for, "mlp", None)
            self._mlps = [getattr(m, "mlp", None) for m in self._ckpt]
            if self._mlp_for is not None and not all(hasattr(m, "recompute_mlp") for m in self._mlps):
                self._mlp_for = None  # (not installed: core.model installs it with mlp_recompute set)

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self._layers_for is not None and "input_ids" in inputs:
                n = inputs["input_ids"].numel()
                k = self._layers_for(n)
                for i, m in enumerate(self._ckpt):
                    m.gradient_checkpointing = i < k
                if self._mlp_for is None:
                    self.checkpointed[k] += 1  # steps by checkpointed layers (tests, the bench)
                else:
                    light = self._mlp_for(n)
                    first = len(self._mlps) - light
                    for i, m in enumerate(self._mlps):
                        m.recompute_mlp = i >= first
                    self.checkpointed[f"{k}+{light}m"] += 1  # checkpointed layers + recomputing MLPs
            if self._trainable is None or not model.training:
                # the full walk: at the first step (from_pretrained leaves the base model in eval
                # mode under a PeftModel in train mode) and after a switch to eval (eval, samples)
                model.train()
            self._lean_params(model)
            model.__dict__["train"] = lambda mode=True: model  # the stock step's own model.train()
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                del model.__dict__["train"]

        def _inner_training_loop(self, *args, **kwargs):
            # train() has just applied liger-kernel, which binds its SwiGLU forward to each MLP
            # over ours: the tiled MLP and the MLP recompute go back on top
            from . import fused_lora

            fused_lora.rewrap(self.model)
            return super()._inner_training_loop(*args, **kwargs)

        @staticmethod
        def get_optimizer_cls_and_kwargs(args, model=None):
            # bitsandbytes' 8-bit AdamW without its device sync after every tensor (core.optim)
            from . import optim

            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
            return optim.without_syncs(cls), kwargs

        def floating_point_ops(self, inputs):
            main = getattr(self.model, "main_input_name", "input_ids")
            if self._n_params is None:
                self._n_params = super().floating_point_ops({main: _OneToken()})
            return self._n_params * inputs[main].numel() if main in inputs else 0

        def _clip_grad_norm(self, model):
            if self._trainable:
                return self.accelerator.clip_grad_norm_(self._trainable, self.args.max_grad_norm)
            return super()._clip_grad_norm(model)

        _num_pad = 0  # pad tokens of the batch in hand (core.dataset.collator, padding-free rows)

        def _prepare_inputs(self, inputs):
            # the collator's pad count is for the token count, not the model (popped from the
            # loop's own dict: the count is read before or after the step, by version)
            if isinstance(inputs, dict) and "num_pad_tokens" in inputs:
                self._num_pad = inputs.pop("num_pad_tokens")
            held = inputs.pop("cpu_input_ids", None) if isinstance(inputs, dict) else None
            inputs = super()._prepare_inputs(inputs)
            if held is not None and self._cpu_emb is not None:
                self._cpu_emb.ids_from(inputs["input_ids"], held.ids)
            return inputs

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            emb = self.model.get_input_embeddings()
            self._cpu_emb = emb if hasattr(emb, "ids_from") else None  # model.embeddings_on_cpu's module
            if self._cpu_emb is not None:  # its lookup is handed the CPU ids: no GPU sync a step
                self.data_collator = _KeepCPUIds(self.data_collator)

        def _track_num_input_tokens(self, inputs):
            # padding-free rows: real tokens = the row's length less the collator's tail padding,
            # read from the shape (no GPU sync)
            main = getattr(self.model, "main_input_name", "input_ids")
            if self.args.include_num_input_tokens_seen == "all" and main in inputs:
                n = inputs[main].numel() - inputs.get("num_pad_tokens", self._num_pad)
                if self.args.world_size > 1:
                    import torch

                    n = self.accelerator.gather(torch.tensor(n, device=self.args.device)).sum().item()
                self.state.num_input_tokens_seen += n
            else:
                super()._track_num_input_tokens(inputs)

    if not offload_activations:
        return LeanTrainer

    class OffloadingTrainer(LeanTrainer):
        """training.offload_activations: tensors saved for backward during the forward (with
        reentrant checkpointing: each layer's input) live in CPU RAM until backward."""

        def compute_loss(self, model, inputs, *args, **kwargs):
            if not model.training:
                return super().compute_loss(model, inputs, *args, **kwargs)
            with offload_saved_tensors():
                return super().compute_loss(model, inputs, *args, **kwargs)

    return OffloadingTrainer


class _KeepCPUIds:
    """A collator whose batches also carry their ids as they were on the CPU, in a holder the
    dataloader's device copy passes by (model.embeddings_on_cpu looks them up from there)."""

    def __init__(self, base):
        self.base = base

    def __call__(self, examples):
        out = self.base(examples)
        out["cpu_input_ids"] = _Held(out["input_ids"])
        return out


class _Held:
    __slots__ = ("ids",)  # no .to(): accelerate's send_to_device and pin_memory leave it be

    def __init__(self, ids):
        self.ids = ids


def offload_saved_tensors():
    """torch.autograd.graph.save_on_cpu, with two differences that matter for long rows.
    torch's pinned allocator rounds every block up to a power of two, so a 2.66 GiB layer input
    (348k tokens of an 8B model) pinned 4 GiB and 32 layers asked a 125 GiB host for 128 GiB: the
    OOM killer ended the run (docs/BENCHMARKS.md). Tensors of memory.PINNED_MAX bytes or more are
    copied to plain RAM at their exact size (a synchronous copy, small beside a layer's compute at
    such lengths); smaller ones to pinned RAM. Parameters saved for
    backward (lm_head's weight under the fused loss) stay where they are: they live on the GPU
    anyway. core.memory.offloaded_gib counts the same way."""
    import torch

    from . import memory

    pin = torch.cuda.is_available()

    def pack(t):
        if isinstance(t, torch.nn.Parameter) or t.is_sparse:
            return t
        pinned = pin and t.numel() * t.element_size() < memory.PINNED_MAX
        cpu = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pinned)
        cpu.copy_(t)
        return t.device, cpu, pinned

    def unpack(packed):
        if not isinstance(packed, tuple):
            return packed
        device, cpu, pinned = packed
        return cpu.to(device, non_blocking=pinned)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class _OneToken:
    """An input of one token: the stock floating_point_ops gives 6 x parameters for it."""

    def numel(self) -> int:
        return 1


def liger_config(kernels: str) -> dict | None:
    """liger-kernel patches for training.kernels (the Trainer applies them to the base model
    under the LoRA wrapper). The fused linear + cross-entropy never builds full-vocab logits."""
    if kernels not in ("loss", "all"):
        return None
    every = kernels == "all"
    return {"fused_linear_cross_entropy": True, "cross_entropy": False, "rope": every, "rms_norm": every,
            "swiglu": every}
