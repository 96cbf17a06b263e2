"""The default training path (padding-free micro-batches, no fp32 upcast under QLoRA, LoRA
dropout 0) computes the same maths as stock HF + PEFT: on the trained tiny model, the same
samples give equal logits, equal loss and equal LoRA gradients. CPU, fp32 (the speed lives in
bench/speed.py on a GPU)."""

import os
import pytest
import torch
from safetensors.torch import load_file

from lorastudio.core import config as config_lib
from lorastudio.core import resolve as resolve_lib
from lorastudio.core import dataset as dataset_lib
from lorastudio.core import model as model_lib
from lorastudio.core import plan as plan_lib
from lorastudio.core import train as train_lib
from lorastudio.core import trainer as trainer_lib


def _cfg(smoke_run, method):
    cfg = config_lib.load(smoke_run / "config.yaml")
    cfg.method = method
    cfg.lora.dropout = 0.0
    cfg.training.device = "cpu"
    cfg.model.dtype = "float32"
    cfg.quantization.bits = 4 if method == "qlora" else None
    cfg.training.gradient_checkpointing = "auto"
    cfg.training.kernels = "auto"
    cfg.template.padding_free = "auto"
    return resolve_lib.resolve(cfg)


def _stock(cfg, tokenizer):
    """HF + PEFT the way their docs show: 4-bit through BitsAndBytesConfig and
    prepare_model_for_kbit_training, LoRA with the same rank/alpha/targets."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if cfg.method == "qlora":
        kw = dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_use_double_quant=True,
                                                         bnb_4bit_compute_dtype=torch.float32),
                  device_map={"": "cpu"})
    base = AutoModelForCausalLM.from_pretrained(model_lib.resolve_path(cfg.model.name_or_path), dtype=torch.float32,
                                                attn_implementation="sdpa", **kw)
    if cfg.method == "qlora":
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    lc = cfg.lora
    return get_peft_model(base, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=0.0,
                                           target_modules=lc.target_modules, task_type="CAUSAL_LM"))


@pytest.mark.parametrize("method,fused", [("lora", False), ("qlora", False), ("lora", True), ("qlora", True)])
def test_fast_path_equals_stock_logits_loss_and_lora_grads(smoke_run, method, fused, monkeypatch):
    from peft import set_peft_model_state_dict
    from transformers import DataCollatorForSeq2Seq

    from lorastudio.core import fused_lora

    calls = []
    apply = fused_lora.LoRALinear.apply
    monkeypatch.setattr(fused_lora.LoRALinear, "apply", lambda *a: calls.append(1) or apply(*a))
    torch.set_num_threads(1)
    cfg = _cfg(smoke_run, method)
    cfg.training.fused_lora = fused  # its auto default is CUDA only; the maths is the same here
    assert cfg.template.padding_free is True and cfg.quantization.fp32_upcast is False
    tokenizer, template, _missing, new_ids = train_lib.load_tokenizer_and_template(cfg)
    train_ds, _eval, _stats, _reports, _hash = train_lib.prepare_data(cfg, tokenizer, template)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in train_ds.select(range(6))]
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(set(lengths)) > 1  # padding really happens on the stock side

    adapter = load_file(str(smoke_run / "adapter" / "adapter_model.safetensors"))
    fast = model_lib.load_for_training(cfg, tokenizer, new_ids)  # the product's path
    stock = _stock(cfg, tokenizer)
    for m in (fast, stock):
        res = set_peft_model_state_dict(m, adapter)
        assert not res.unexpected_keys
        m.train()
    if method == "qlora":
        assert sum(type(m).__name__ == "Linear4bit" for m in fast.modules()) > 0

    packed = dataset_lib.collator(tokenizer, padding_free=True)(rows)  # the product's collator
    padded = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)(
        [dict(r) for r in rows])  # stock: pad to the longest, attention mask
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert padded["input_ids"].shape == (6, max(lengths))

    out_fast = fast(**packed, use_cache=False)
    out_stock = stock(**padded, use_cache=False)
    n_lora = sum(hasattr(m, "lora_A") for m in fast.modules())
    assert len(calls) == (n_lora if fused else 0) and n_lora > 0  # one fused node per LoRA layer
    torch.testing.assert_close(out_fast.loss, out_stock.loss, rtol=1e-5, atol=1e-6)
    start = 0
    for i, n in enumerate(lengths):  # every sample's logits, pad positions excluded
        torch.testing.assert_close(out_fast.logits[0, start:start + n], out_stock.logits[i, :n], rtol=1e-4, atol=1e-4)
        start += n

    out_fast.loss.backward()
    out_stock.loss.backward()
    g_fast = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    g_stock = {n: p.grad for n, p in stock.named_parameters() if p.requires_grad}
    assert set(g_fast) == set(g_stock) and len(g_fast) > 0
    for name in g_fast:
        assert g_fast[name] is not None and g_fast[name].abs().sum() > 0, name
        torch.testing.assert_close(g_fast[name], g_stock[name], rtol=1e-3, atol=1e-6, msg=name)


def test_padding_free_is_off_for_remote_code_and_kernels_need_cuda():
    cfg = config_lib.from_dict({"model": {"trust_remote_code": True}, "training": {"device": "cpu"}})
    assert resolve_lib.resolve(cfg).template.padding_free is False  # its attention may ignore position_ids
    cfg = config_lib.from_dict({"training": {"device": "cpu", "neftune_alpha": 5}})
    assert resolve_lib.resolve(cfg).template.padding_free is False  # NEFTune's noise scales with row length
    cfg = config_lib.from_dict({"training": {"device": "cpu", "kernels": "loss"}})
    with pytest.raises(config_lib.ConfigError, match="training.kernels: loss needs CUDA"):
        resolve_lib.resolve(cfg)
    cfg = config_lib.from_dict({"training": {"device": "cpu"}})
    assert resolve_lib.resolve(cfg).training.kernels == "off"
    assert resolve_lib.resolve(cfg).training.fused_lora is False  # auto: CUDA only


def test_fused_lora_auto_rules(monkeypatch):
    """auto: on for CUDA LoRA/QLoRA without dropout or DoRA, off when sharded (FSDP / ZeRO-3 hold
    the frozen weight in shards the fused backward would read)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def fused(**over):
        raw = {"method": "lora", "training": {"device": "cuda"}, "lora": {}}
        for key, value in over.items():
            section, field = key.split("__")
            raw.setdefault(section, {})[field] = value
        return resolve_lib.resolve(config_lib.from_dict(raw)).training.fused_lora

    assert fused() is True
    assert fused(lora__dropout=0.05) is False
    assert fused(lora__use_dora=True) is False
    assert fused(training__gpus=2, training__strategy="fsdp") is False
    assert fused(training__gpus=2, training__strategy="ddp") is True
    assert fused(lora__dropout=0.05, training__fused_lora=True) is True  # explicit: dropout layers fall back


def test_training_log_run_json_and_train_tab_name_the_speed_path(smoke_run, monkeypatch):
    from lorastudio.core import runs
    from lorastudio.webui import train_view

    log = (smoke_run / "train.log").read_text()
    assert ("speed path: padding-free True, packing False, rows padded to a multiple of 1, kernels off, "
            "fused lora False, tiled MLP False") in log
    sp = runs.read_json(smoke_run)["speed_path"]
    assert sp["padding_free"] is True and sp["kernels"] == "off" and sp["gradient_checkpointing"] is False
    assert sp["pad_to_multiple_of"] == 1 and sp["tiled_mlp"] is False  # CPU: no row padding, no tiles
    assert sp["cudnn_attention"] is False
    assert sp["optimizer"] == "adamw_torch" and sp["fp32_upcast"] is None  # lora on CPU
    # the child picks the expandable-segments allocator (memory.ALLOC_CONF) unless told otherwise
    assert sp["cuda_alloc_conf"] == os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert "CUDA allocator expandable_segments:True" in log
    monkeypatch.setenv("LORASTUDIO_ALLOW_DIRS", str(smoke_run.parent))  # what --allow-dir does
    md = train_view.status_markdown(train_view.run_view(str(smoke_run)))
    assert "speed path: padding-free; no fused kernels; optimizer adamw_torch" in md


def test_qlora_keeps_non_quantized_weights_in_the_compute_dtype(smoke_run):
    """Stock prepare_model_for_kbit_training upcasts embeddings, norms and lm_head to fp32; the
    product keeps them in the compute dtype (bf16 here, built on CPU) unless fp32_upcast is on."""
    torch.set_num_threads(1)
    cfg = _cfg(smoke_run, "qlora")
    tokenizer, _template, _missing, new_ids = train_lib.load_tokenizer_and_template(cfg)
    cfg.model.dtype = "bfloat16"  # a GPU run's dtype; loading (not training) works on CPU
    for upcast, want in ((False, torch.bfloat16), (True, torch.float32)):
        cfg.quantization.fp32_upcast = upcast
        m = model_lib.load_for_training(cfg, tokenizer, new_ids)
        dtypes = {n: p.dtype for n, p in m.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
        assert dtypes and {d for n, d in dtypes.items() if "norm" in n or "embed" in n} == {want}, (upcast, dtypes)


def test_lora_input_cast_is_a_no_op_under_autocast():
    """Why core.model turns PEFT's LoRA input cast off for 16-bit training on CUDA: under autocast
    the fp32 copy of each input is cast straight back (bf16 -> fp32 -> bf16 is exact), so logits
    and LoRA gradients are bit-identical without it (checked here with CPU autocast)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    path = model_lib.resolve_path("builtin:tiny")
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    out = {}
    for cast in (True, False):
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        torch.manual_seed(0)
        m = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
        n_lora = 0
        for mod in m.modules():
            if hasattr(mod, "cast_input_dtype_enabled"):
                mod.cast_input_dtype_enabled = cast
                n_lora += 1
        assert n_lora > 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res = m(input_ids=ids, labels=ids)
        res.loss.backward()
        out[cast] = (res.logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert torch.equal(out[True][0], out[False][0])
    for name, g in out[True][1].items():
        assert torch.equal(g, out[False][1][name]), name


def test_offloaded_activations_same_grads_and_only_layer_inputs_saved(smoke_run, monkeypatch):
    """training.offload_activations: reentrant checkpointing under save_on_cpu: the same loss and
    LoRA gradients as plain checkpointing, and what goes to CPU RAM is each layer's input, not
    every intermediate (counted through the save_on_cpu hooks)."""
    torch.set_num_threads(1)
    packed_shapes: list = []
    real = trainer_lib.offload_saved_tensors

    def spy():
        hooks = real()
        pack = hooks.pack_hook

        def counted(t):
            packed_shapes.append(tuple(t.shape))
            return pack(t)

        hooks.pack_hook = counted
        return hooks

    monkeypatch.setattr(trainer_lib, "offload_saved_tensors", spy)
    results = {}
    for offload in (False, True):
        cfg = _cfg(smoke_run, "lora")
        cfg.training.gradient_checkpointing = True
        cfg.training.offload_activations = offload
        tokenizer, template, _m, new_ids = train_lib.load_tokenizer_and_template(cfg)
        train_ds, *_ = train_lib.prepare_data(cfg, tokenizer, template)
        model = model_lib.load_for_training(cfg, tokenizer, new_ids)
        model.train()
        trainer = train_lib.build_trainer(cfg, smoke_run.parent / f"offload-{offload}", model, tokenizer, template,
                                          train_ds, None)
        assert type(trainer).__name__ == ("OffloadingTrainer" if offload else "LeanTrainer")
        batch = dataset_lib.collator(tokenizer, True)([{k: r[k] for k in ("input_ids", "labels")}
                                                       for r in train_ds.select(range(4))])
        before = len(packed_shapes)
        loss = trainer.compute_loss(model, batch)
        n_packed = len(packed_shapes) - before
        loss.backward()
        results[offload] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
                            n_packed)
    torch.testing.assert_close(results[True][0], results[False][0])
    for name, g in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert results[False][2] == 0  # plain checkpointing: no offloading at all
    n_layers, width = model.config.num_hidden_layers, model.config.hidden_size  # the tiny model's
    hidden = [s for s in packed_shapes if len(s) == 3 and s[-1] == width]
    assert len(hidden) >= n_layers  # each layer's input went through the CPU hooks
    # observed 14: 4 layer inputs + the final norm, lm_head and loss inputs (not every intermediate)
    assert results[True][2] <= n_layers + 12


@pytest.mark.parametrize("method,fused,checkpointed,offload", [
    ("lora", False, False, False), ("lora", False, True, False), ("lora", False, True, True),
    ("qlora", True, True, True)])
def test_tiled_mlp_same_loss_and_lora_grads(smoke_run, method, fused, checkpointed, offload):
    """training.tiled_mlp: the MLPs over 16-token tiles give the plain model's loss and every LoRA
    gradient (MLP adapters included): alone, under checkpointing (non-reentrant: 32k-token rows
    that fit the GPU) and under reentrant checkpointing with offloaded activations (the long-context
    setting); the layer's recompute runs the tiled forward again."""
    from peft import set_peft_model_state_dict

    from lorastudio.core import tiled_mlp

    torch.set_num_threads(1)
    cfg = _cfg(smoke_run, method)
    cfg.training.fused_lora = fused  # the CUDA default, here on CPU: the tiles' recompute runs it too
    cfg.training.gradient_checkpointing = checkpointed
    cfg.training.offload_activations = offload
    tokenizer, template, _m, new_ids = train_lib.load_tokenizer_and_template(cfg)
    train_ds, *_ = train_lib.prepare_data(cfg, tokenizer, template)
    batch = dataset_lib.collator(tokenizer, True)([{k: r[k] for k in ("input_ids", "labels")}
                                                   for r in train_ds.select(range(4))])
    assert batch["input_ids"].shape[1] > 3 * 16  # several tiles
    adapter = load_file(str(smoke_run / "adapter" / "adapter_model.safetensors"))
    out = {}
    for tiled in (False, True):
        model = model_lib.load_for_training(cfg, tokenizer, new_ids)
        set_peft_model_state_dict(model, adapter)
        model.train()
        if tiled:
            n_layers = model.config.num_hidden_layers
            assert tiled_mlp.install(model, 16) == n_layers
        with trainer_lib.offload_saved_tensors() if offload else torch.enable_grad():
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        out[tiled] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-6, atol=1e-6)
    mlp_grads = [n for n in out[False][1] if "mlp" in n]
    assert mlp_grads and all(out[True][1][n].abs().sum() > 0 for n in mlp_grads)
    for name, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_tiled_mlp_keeps_one_input_per_mlp_for_backward(smoke_run):
    """What the tiles save: counted through autograd's saved-tensor hooks over a real forward,
    each MLP keeps its input (L x hidden) for backward instead of its intermediates (gate, up,
    their activation and product: L x intermediate each, here 512 vs 256 wide)."""
    from lorastudio.core import tiled_mlp

    torch.set_num_threads(1)
    cfg = _cfg(smoke_run, "lora")
    tokenizer, template, _m, new_ids = train_lib.load_tokenizer_and_template(cfg)
    train_ds, *_ = train_lib.prepare_data(cfg, tokenizer, template)
    batch = dataset_lib.collator(tokenizer, True)([{k: r[k] for k in ("input_ids", "labels")}
                                                   for r in train_ds.select(range(4))])
    L = batch["input_ids"].shape[1]
    saved = {}
    for tiled in (False, True):
        model = model_lib.load_for_training(cfg, tokenizer, new_ids)
        model.train()
        if tiled:
            tiled_mlp.install(model, 16)
        total = [0]

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # what the forward keeps
            loss = model(**batch, use_cache=False).loss
        saved[tiled] = total[0]
        loss.backward()  # (each tile's recompute in backward keeps only that tile's intermediates)
    c = model.config
    fp32 = 4
    # at least gate, up and one more L x intermediate tensor fewer per layer
    assert saved[False] - saved[True] >= c.num_hidden_layers * 3 * L * c.intermediate_size * fp32, saved


def test_tiled_mlp_auto_and_refusals():
    """auto: off on CPU (the memory plan decides on CUDA: tests/test_estimate.py); dropout > 0 or
    several GPUs refuse it when asked for (recomputed tiles would draw new masks; gradient hooks)."""
    assert resolve_lib.resolve(config_lib.from_dict({"training": {"device": "cpu"}})).training.tiled_mlp is False
    with pytest.raises(config_lib.ConfigError, match="training.tiled_mlp: needs lora.dropout 0"):
        resolve_lib.resolve(config_lib.from_dict({"training": {"device": "cpu", "tiled_mlp": True},
                                                 "lora": {"dropout": 0.1}}))
    with pytest.raises(config_lib.ConfigError, match="training.tiled_mlp: one GPU only"):
        resolve_lib.resolve(config_lib.from_dict({"training": {"device": "cpu", "tiled_mlp": True, "gpus": 2}}))


def test_cudnn_attention_auto_and_refusal():
    """auto: off on CPU (on CUDA the memory plan decides from the row length); asked for on CPU
    it is a config error naming the field, not a silent no-op."""
    assert resolve_lib.resolve(config_lib.from_dict({"training": {"device": "cpu"}})).training.cudnn_attention is False
    with pytest.raises(config_lib.ConfigError, match="training.cudnn_attention: CUDA only"):
        resolve_lib.resolve(config_lib.from_dict({"training": {"device": "cpu", "cudnn_attention": True}}))


def test_offload_hooks_copy_activations_not_parameters():
    """What the offloading hooks keep: a copy of each saved activation (restored equal), the
    parameters themselves (already resident; copying lm_head's weight each step would waste RAM)."""
    hooks = trainer_lib.offload_saved_tensors()
    w = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 3)
    assert hooks.pack_hook(w) is w and hooks.unpack_hook(w) is w
    packed = hooks.pack_hook(x)
    assert isinstance(packed, tuple) and packed[1] is not x and packed[2] is False  # CPU: nothing pinned
    torch.testing.assert_close(hooks.unpack_hook(packed), x, rtol=0, atol=0)
    with hooks:  # in use: the same gradients as without
        y = (torch.nn.functional.linear(x.requires_grad_(), w) ** 2).sum()
    y.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (torch.nn.functional.linear(x, w) ** 2).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def test_cpu_embedding_table_keeps_outputs_and_model_device():
    """model.embeddings_on_cpu: the table is not a registered parameter (model.device stays the
    GPU's), lookups give the same rows, input gradients still flow for checkpointing."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    m = AutoModelForCausalLM.from_pretrained(model_lib.resolve_path("builtin:tiny"), dtype=torch.float32)
    ids = torch.randint(5, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    n_params = sum(p.numel() for p in m.parameters())
    table = m.get_input_embeddings().weight
    model_lib.embeddings_on_cpu(m)
    emb = m.get_input_embeddings()
    assert type(emb).__name__ == "CPUEmbedding" and emb.weight.shape == table.shape
    assert sum(p.numel() for p in m.parameters()) == n_params - table.numel() * (0 if m.config.tie_word_embeddings else 1)
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, ref)
    m.enable_input_require_grads()
    assert m.get_input_embeddings()(ids).requires_grad


def test_cpu_embedding_is_handed_its_ids_by_the_trainer(smoke_run, tmp_path):
    """model.embeddings_on_cpu in training: each step's lookup uses the batch's ids as they were
    on the CPU (copying them back from the GPU would wait for its queue to drain, every step),
    with the losses of the table left in place; a lookup outside the trainer still works."""
    torch.set_num_threads(1)
    cfg = _cfg(smoke_run, "lora")
    cfg.training.max_steps, cfg.training.logging_steps, cfg.training.micro_batch_size = 3, 1, 2
    cfg.training.save_steps = 10 ** 6
    tokenizer, template, _m, new_ids = train_lib.load_tokenizer_and_template(cfg)
    train_ds, *_ = train_lib.prepare_data(cfg, tokenizer, template)
    losses = {}
    for on_cpu in (False, True):
        torch.manual_seed(0)
        model = model_lib.load_for_training(cfg, tokenizer, new_ids)
        if on_cpu:  # (resolve allows it for QLoRA on CUDA only; the hand-over is the same code)
            model_lib.embeddings_on_cpu(model.get_base_model())
        trainer = train_lib.build_trainer(cfg, tmp_path / f"emb-{on_cpu}", model, tokenizer, template, train_ds, None)
        trainer.train()
        losses[on_cpu] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    emb = model.get_input_embeddings()
    assert type(emb).__name__ == "CPUEmbedding"
    assert emb.synced == 0  # every training lookup was handed its ids
    assert losses[True] == pytest.approx(losses[False], rel=1e-6) and len(losses[True]) == 3
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    assert emb.synced == 1


def test_lean_trainer_steps_like_the_stock_trainer(smoke_run, tmp_path):
    """The product's Trainer subclass skips per-step module walks and a GPU sync; over real steps
    it gives the stock Trainer's losses, gradient norms, token count and FLOPs, and a switch to
    eval mid-run (sample replies) is undone before the next step."""
    from transformers import Trainer, TrainerCallback

    torch.set_num_threads(1)
    cfg = _cfg(smoke_run, "lora")
    cfg.lora.dropout = 0.1  # dropout makes train mode visible in the loss
    cfg.training.max_steps, cfg.training.logging_steps, cfg.training.micro_batch_size = 6, 1, 4
    cfg.training.grad_accum, cfg.training.save_steps = 2, 10 ** 6
    cfg.training.gradient_checkpointing = True
    tokenizer, template, _m, new_ids = train_lib.load_tokenizer_and_template(cfg)
    train_ds, *_ = train_lib.prepare_data(cfg, tokenizer, template)

    class EvalMidRun(TrainerCallback):  # what write_samples does between steps
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 3:
                model.eval()

    out = {}
    for lean in (True, False, "padded"):
        torch.manual_seed(0)
        cfg.template.pad_to_multiple_of = 64 if lean == "padded" else 1
        model = model_lib.load_for_training(cfg, tokenizer, new_ids)
        trainer = train_lib.build_trainer(cfg, tmp_path / f"lean-{lean}", model, tokenizer, template, train_ds, None,
                                          callbacks=[EvalMidRun()])
        if not lean:
            trainer = Trainer(model=model, args=trainer.args, train_dataset=train_ds,
                              data_collator=trainer.data_collator, processing_class=tokenizer,
                              callbacks=[EvalMidRun()])
        else:
            assert type(trainer).__name__ == "LeanTrainer"
        # from_pretrained leaves the base model in eval mode under a PeftModel in train mode: the
        # decoder layers must train (their checkpointing and dropout depend on it) from step 1 on
        layer_modes = []
        model.get_base_model().model.layers[0].register_forward_pre_hook(
            lambda mod, args: layer_modes.append(mod.training))
        trainer.train()
        assert len(layer_modes) >= 12 and all(layer_modes), layer_modes
        assert all(m.training for m in model.modules())  # the eval switch at step 3 was undone
        hist = [h for h in trainer.state.log_history if "loss" in h]
        out[lean] = ([h["loss"] for h in hist], [h["grad_norm"] for h in hist], trainer.state.num_input_tokens_seen,
                     trainer.state.total_flos)
    assert len(out[True][0]) == 6
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    assert out[True][1] == pytest.approx(out[False][1], rel=1e-5)
    assert out[True][2] == out[False][2] > 0
    assert out[True][3] == out[False][3] > 0
    # rows padded to a multiple of 64: the pad tail changes no loss (to dropout's draws, which follow
    # the row's length: a pad token in the loss would move it by ~1e-2), tokens seen = real tokens only
    assert out["padded"][0][0] == pytest.approx(out[True][0][0], rel=1e-6)  # step 1: the same masks
    # (tiny build 4: up to 1.2e-3 on losses and 2.1% on gradient norms from the draws alone)
    assert out["padded"][0] == pytest.approx(out[True][0], rel=2.5e-3)
    assert out["padded"][1] == pytest.approx(out[True][1], rel=4e-2)
    assert out["padded"][2] == out[True][2]


def test_padded_padding_free_rows_keep_samples_apart(smoke_run):
    """pad_to_multiple_of on a padding-free row: the pad tail continues the last sample's
    positions (no new segment: one sample stays plain causal attention), carries label -100, the
    varlen boundaries cover it, and every real token's logits and the loss are those of the
    unpadded row."""
    from transformers.masking_utils import find_packed_sequence_indices

    torch.set_num_threads(1)
    cfg = _cfg(smoke_run, "lora")
    tokenizer, template, _m, new_ids = train_lib.load_tokenizer_and_template(cfg)
    train_ds, *_ = train_lib.prepare_data(cfg, tokenizer, template)
    rows = [{k: r[k] for k in ("input_ids", "labels")} for r in train_ds.select(range(6))]
    while sum(len(r["input_ids"]) for r in rows) % 64 == 0:  # a row that needs padding
        rows.pop()
    n = sum(len(r["input_ids"]) for r in rows)
    plain = dataset_lib.collator(tokenizer, True)(rows)
    padded = dataset_lib.collator(tokenizer, True, 64)(rows)
    pad = padded.pop("num_pad_tokens")
    assert padded["input_ids"].shape == (1, n + pad) and pad == -n % 64 and pad > 0
    assert (padded["labels"][0, n:] == -100).all() and (padded["input_ids"][0, n:] == tokenizer.pad_token_id).all()
    last = plain["position_ids"][0, -1].item()
    assert padded["position_ids"][0, n:].tolist() == list(range(last + 1, last + 1 + pad))
    assert padded["cu_seq_lens_q"].tolist() == plain["cu_seq_lens_q"].tolist()[:-1] + [n + pad]
    assert padded["seq_idx"].shape == (1, n + pad)
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(padded[key][:, :n], plain[key])
    # one sample: no segment boundary appears, so attention stays plain causal (no L x L mask)
    one = dataset_lib.collator(tokenizer, True, 64)(rows[:1])
    one.pop("num_pad_tokens")
    assert find_packed_sequence_indices(one["position_ids"]) is None
    assert find_packed_sequence_indices(padded["position_ids"]) is not None  # several samples: block mask
    model = model_lib.load_for_training(cfg, tokenizer, new_ids)
    model.eval()
    with torch.no_grad():
        a = model(**plain, use_cache=False)
        b = model(**padded, use_cache=False)
    torch.testing.assert_close(b.logits[:, :n], a.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-6, atol=1e-6)
    # not padding-free: TRL pads each row to the multiple, attention mask 0 on the pad
    rect = dataset_lib.collator(tokenizer, False, 64)(rows)
    assert rect["input_ids"].shape[1] % 64 == 0 and rect["attention_mask"].sum() == n
    assert resolve_lib.resolve(config_lib.from_dict({"training": {"device": "cpu"}})).template.pad_to_multiple_of == 1


def test_fused_lora_weight_copies_follow_every_optimizer_step(smoke_run):
    """The fused layers keep (s*A, B) in the compute dtype for one optimizer step
    (fused_lora.compute_weights). An optimizer that writes the weights behind autograd's back, as
    bitsandbytes' CUDA kernels do (no version bump), must still be seen: after each step the
    fused forward and gradients equal PEFT's own on the new weights."""
    from lorastudio.core import fused_lora

    class RawSGD(torch.optim.Optimizer):  # updates through .data: the version counter stays put
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.data.add_(p.grad, alpha=-group["lr"])

    torch.set_num_threads(1)
    cfg = _cfg(smoke_run, "lora")
    cfg.training.fused_lora = True
    tokenizer, _template, _m, new_ids = train_lib.load_tokenizer_and_template(cfg)
    model = model_lib.load_for_training(cfg, tokenizer, new_ids)
    layer = next(m for m in model.modules() if hasattr(m, "lora_A"))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.nn.init.normal_(B)
    x = torch.randn(2, 5, layer.in_features)
    opt = RawSGD([A, B], lr=0.05)
    for _ in range(3):
        versions = A._version, B._version
        model.train()
        y = layer(x)
        cached = layer.__dict__["_lorastudio_w16"][1]
        y.square().mean().backward()
        fused_grads = A.grad.clone(), B.grad.clone()
        A.grad = B.grad = None
        model.eval()  # PEFT's own forward on the same weights
        y_ref = layer(x)
        y_ref.square().mean().backward()
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused_grads[0], A.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused_grads[1], B.grad, rtol=1e-4, atol=1e-5)
        opt.step()
        assert (A._version, B._version) == versions  # the update was invisible to autograd
        A.grad = B.grad = None
        model.train()
        layer(x)
        assert layer.__dict__["_lorastudio_w16"][1] is not cached  # a new copy after the step
    fused_lora.drop_compute_weights(model)
    assert "_lorastudio_w16" not in layer.__dict__


def test_fused_lora_falls_back_outside_plain_training(smoke_run):
    """Chat's disable_adapter(), eval mode and LoRA dropout take PEFT's own forward."""
    from lorastudio.core import fused_lora

    torch.set_num_threads(1)
    cfg = _cfg(smoke_run, "lora")
    cfg.training.fused_lora = True
    tokenizer, _template, _m, new_ids = train_lib.load_tokenizer_and_template(cfg)
    model = model_lib.load_for_training(cfg, tokenizer, new_ids)
    layer = next(m for m in model.modules() if hasattr(m, "lora_A"))
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # B = 0 at init would hide the adapter
    x = torch.randn(2, 5, layer.in_features)
    model.train()
    fused_out = layer(x)
    assert "forward" in layer.__dict__
    with model.disable_adapter():
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x))
    model.eval()
    torch.testing.assert_close(layer(x), fused_out, rtol=1e-5, atol=1e-6)  # PEFT's forward, same value
    assert not torch.allclose(fused_out, layer.get_base_layer()(x))
    model.train()
    layer.lora_dropout["default"] = torch.nn.Dropout(0.5)  # dropout: PEFT's path (random masks)
    calls = []
    orig = fused_lora.LoRALinear.apply
    fused_lora.LoRALinear.apply = lambda *a: calls.append(1) or orig(*a)
    try:
        layer(x)
        assert calls == []
        layer.lora_dropout["default"] = torch.nn.Identity()
        layer(x)
        assert calls == [1]  # back on the fused path
        layer.get_base_layer().weight.requires_grad_(True)  # a trained base weight: PEFT's path
        layer(x)
        assert calls == [1]
    finally:
        fused_lora.LoRALinear.apply = orig


def test_memory_plan_sizes_the_largest_padded_row(monkeypatch):
    """The training child's memory plan sizes the largest micro-batch as the collator builds it:
    the longest samples in one row, padded up to the multiple (190 tokens -> 192 with 64)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (80 * 2 ** 30, 80 * 2 ** 30))
    cfg = config_lib.from_dict({"training": {"device": "cpu", "micro_batch_size": 2}})
    cfg = resolve_lib.resolve(cfg)
    cfg.training.gradient_checkpointing = "auto"  # what a CUDA run leaves to the plan
    cfg.template.pad_to_multiple_of = 64
    _decided, why, _budget = plan_lib.memory_plan(cfg, [100, 90, 80])
    assert any("largest micro-batch (192 tokens)" in w for w in why), why
    cfg.template.pad_to_multiple_of = 1
    cfg.training.gradient_checkpointing = "auto"
    _decided, why, _budget = plan_lib.memory_plan(cfg, [100, 90, 80])
    assert any("largest micro-batch (190 tokens)" in w for w in why), why


@pytest.mark.parametrize("method,reentrant", [("lora", True), ("qlora", True), ("lora", False), ("qlora", False)])
def test_checkpointing_some_layers_same_loss_and_grads_less_memory(smoke_run, method, reentrant):
    """training.checkpoint_layers: checkpointing the first N decoder layers gives the plain path's
    loss and every LoRA gradient, and what the forward keeps for backward falls as N grows
    (counted through autograd's saved-tensor hooks: a checkpointed layer keeps its input only);
    with torch's reentrant checkpoint (training.checkpoint_reentrant, auto on one GPU) and without."""
    from peft import set_peft_model_state_dict

    torch.set_num_threads(1)
    cfg = _cfg(smoke_run, method)
    assert cfg.training.checkpoint_reentrant is True  # auto, one device
    cfg.training.checkpoint_reentrant = reentrant
    tokenizer, template, _m, new_ids = train_lib.load_tokenizer_and_template(cfg)
    train_ds, *_ = train_lib.prepare_data(cfg, tokenizer, template)
    batch = dataset_lib.collator(tokenizer, True)([{k: r[k] for k in ("input_ids", "labels")}
                                                   for r in train_ds.select(range(4))])
    adapter = load_file(str(smoke_run / "adapter" / "adapter_model.safetensors"))
    out, saved = {}, {}
    for layers in (0, 1, 2, "all"):
        cfg.training.gradient_checkpointing = layers != 0
        cfg.training.checkpoint_layers = layers or "all"
        model = model_lib.load_for_training(cfg, tokenizer, new_ids)
        set_peft_model_state_dict(model, adapter)
        model.train()
        total = [0]

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        saved[layers] = total[0]
        out[layers] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert model.config.num_hidden_layers == 4
    assert saved[0] > saved[1] > saved[2] > saved["all"], saved
    for layers in (1, 2, "all"):
        torch.testing.assert_close(out[layers][0], out[0][0], rtol=1e-6, atol=1e-6)
        for name, g in out[0][1].items():
            torch.testing.assert_close(out[layers][1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_oom_retry_checkpoints_every_layer_first():
    from lorastudio.core import recovery

    cfg = config_lib.from_dict({"training": {"device": "cuda", "gradient_checkpointing": True, "checkpoint_layers": 20,
                                             "micro_batch_size": 4, "grad_accum": 2}})
    assert recovery.oom_retry_overrides(cfg) == {"training.gradient_checkpointing": True,
                                                 "training.checkpoint_layers": "all"}
    cfg.training.checkpoint_layers = "all"
    assert recovery.oom_retry_overrides(cfg) == {"training.micro_batch_size": 2, "training.grad_accum": 4}


def test_checkpointed_layers_follow_each_batch(smoke_run, tmp_path):
    """training.checkpoint_per_batch: before each step the trainer checkpoints the layers the
    batch's own length needs; the flags follow the batches (short ones: none, long ones: every
    layer) and the losses and gradient norms equal a run without checkpointing."""
    torch.set_num_threads(1)
    cfg = _cfg(smoke_run, "lora")
    cfg.training.max_steps, cfg.training.logging_steps, cfg.training.micro_batch_size = 6, 1, 2
    cfg.training.grad_accum, cfg.training.save_steps = 1, 10 ** 6
    tokenizer, template, _m, new_ids = train_lib.load_tokenizer_and_template(cfg)
    train_ds, *_ = train_lib.prepare_data(cfg, tokenizer, template)
    sizes = sorted(len(r["input_ids"]) for r in train_ds)
    cut = sizes[len(sizes) // 2] * 2  # about half the 2-row batches are longer than this
    out = {}
    for by_batch in (False, True):
        torch.manual_seed(0)
        cfg.training.gradient_checkpointing = by_batch
        model = model_lib.load_for_training(cfg, tokenizer, new_ids)
        trainer = train_lib.build_trainer(cfg, tmp_path / f"by-batch-{by_batch}", model, tokenizer, template,
                                          train_ds, None)
        seen = []
        if by_batch:
            trainer.checkpoint_by_batch(lambda n: 4 if n > cut else 0)
            first = model.get_base_model().model.layers[0]
            first.register_forward_pre_hook(lambda mod, args: seen.append(mod.gradient_checkpointing))
        trainer.train()
        hist = [h for h in trainer.state.log_history if "loss" in h]
        out[by_batch] = ([h["loss"] for h in hist], [h["grad_norm"] for h in hist])
    assert set(trainer.checkpointed) == {0, 4} and sum(trainer.checkpointed.values()) == 6, trainer.checkpointed
    assert True in seen and False in seen  # the layer ran checkpointed for some batches only
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    assert out[True][1] == pytest.approx(out[False][1], rel=1e-5)


def test_layers_by_batch_grow_with_the_batch_up_to_the_plan():
    from lorastudio.core import memory, model_configs

    arch = model_configs.lookup("meta-llama/Llama-3.1-8B")
    cfg = resolve_lib.resolve(config_lib.from_dict({
        "model": {"name_or_path": "meta-llama/Llama-3.1-8B"}, "method": "qlora",
        "training": {"micro_batch_size": 1, "device": "cuda"}}), resolve_lib.assumed("cuda"))
    cfg = resolve_lib.fill(cfg, resolve_lib.unplanned(cfg))
    layers = memory.layers_by_batch(cfg, arch, free_gib=30.0, most=24)
    ks = [layers(n) for n in (256, 1024, 2048, 4096, 8192, 32768)]
    assert ks == sorted(ks) and ks[0] == 0 and ks[-1] == 24, ks  # capped at the plan's count
    assert 0 < layers(4096) < 24 and layers(4096) == memory.fewest_layers(cfg, arch, 4096, 30.0)


@pytest.mark.parametrize("method,layers", [("lora", 0), ("qlora", 0), ("lora", 2), ("qlora", 1)])
def test_mlp_recompute_same_loss_and_grads_less_memory(smoke_run, method, layers):
    """training.mlp_recompute: the MLPs of the last N layers keep only their input for backward and
    recompute gate and up there (core.fused_lora.LoRAMLP, one autograd node): the plain path's
    loss and every LoRA gradient, MLP adapters included, alone and beside checkpointed layers;
    what the forward keeps falls by at least gate, up and their product a recomputing MLP."""
    from peft import set_peft_model_state_dict

    from lorastudio.core import fused_lora

    torch.set_num_threads(1)
    cfg = _cfg(smoke_run, method)
    cfg.training.fused_lora = True  # its auto default is CUDA only; the maths is the same here
    cfg.training.gradient_checkpointing = layers != 0
    cfg.training.checkpoint_layers = layers or "all"
    tokenizer, template, _m, new_ids = train_lib.load_tokenizer_and_template(cfg)
    train_ds, *_ = train_lib.prepare_data(cfg, tokenizer, template)
    batch = dataset_lib.collator(tokenizer, True)([{k: r[k] for k in ("input_ids", "labels")}
                                                   for r in train_ds.select(range(4))])
    adapter = load_file(str(smoke_run / "adapter" / "adapter_model.safetensors"))
    calls = []
    apply = fused_lora.LoRAMLP.apply
    out, saved = {}, {}
    for mlps in (0, "all"):
        cfg.training.mlp_recompute = mlps
        model = model_lib.load_for_training(cfg, tokenizer, new_ids)
        set_peft_model_state_dict(model, adapter)
        model.train()
        total = [0]

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                total[0] += t.numel() * t.element_size()
            return t

        fused_lora.LoRAMLP.apply = lambda *a: calls.append(1) or apply(*a)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(**batch, use_cache=False).loss
            loss.backward()
        finally:
            fused_lora.LoRAMLP.apply = apply
        saved[mlps] = total[0]
        out[mlps] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    n_layers = model.config.num_hidden_layers
    assert len(calls) == n_layers - layers  # the checkpointed layers keep their plain MLP
    torch.testing.assert_close(out["all"][0], out[0][0], rtol=1e-6, atol=1e-6)
    mlp_grads = [n for n in out[0][1] if "mlp" in n]
    assert mlp_grads and all(out["all"][1][n].abs().sum() > 0 for n in mlp_grads)
    for name, g in out[0][1].items():
        torch.testing.assert_close(out["all"][1][name], g, rtol=1e-5, atol=1e-7, msg=name)
    L, c = batch["input_ids"].shape[1], model.config
    assert saved[0] - saved["all"] >= (n_layers - layers) * 3 * L * c.intermediate_size * 4, saved


def test_mlp_recompute_falls_back_outside_plain_training(smoke_run):
    """The recompute is for training alone: eval, no_grad (a reentrant checkpoint's first pass) and
    a disabled adapter run the plain MLP; the flag off does too."""
    from lorastudio.core import fused_lora

    torch.set_num_threads(1)
    cfg = _cfg(smoke_run, "lora")
    cfg.training.fused_lora = True
    cfg.training.mlp_recompute = "all"
    tokenizer, *_ = train_lib.load_tokenizer_and_template(cfg)
    model = model_lib.load_for_training(cfg, tokenizer, [])
    mlps = fused_lora.install_mlp(model)  # idempotent
    assert len(mlps) == model.config.num_hidden_layers and all(m.recompute_mlp for m in mlps)
    calls = []
    apply = fused_lora.LoRAMLP.apply
    fused_lora.LoRAMLP.apply = lambda *a: calls.append(1) or apply(*a)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    try:
        model.eval()
        model(input_ids=ids)
        model.train()
        with torch.no_grad():
            model(input_ids=ids)
        with model.disable_adapter():
            model(input_ids=ids)
        fused_lora.set_mlp_recompute(mlps, 0)
        model(input_ids=ids).logits.sum().backward()
        assert calls == []
        fused_lora.set_mlp_recompute(mlps, 1)
        model(input_ids=ids).logits.sum().backward()
        assert len(calls) == 1
    finally:
        fused_lora.LoRAMLP.apply = apply


def test_mlp_wrappers_go_back_on_top_after_a_rebind(smoke_run):
    """liger-kernel binds its SwiGLU forward to each MLP when Trainer.train() starts, over the
    tiled MLP and the MLP recompute: fused_lora.rewrap (the trainer's first act in the loop) puts
    both back, the rebound forward beneath them."""
    import types

    from lorastudio.core import fused_lora, tiled_mlp

    cfg = _cfg(smoke_run, "lora")
    cfg.training.fused_lora = True
    cfg.training.mlp_recompute = "all"
    cfg.training.tiled_mlp = True
    tokenizer, *_ = train_lib.load_tokenizer_and_template(cfg)
    model = model_lib.load_for_training(cfg, tokenizer, [])
    mlp = model.get_base_model().model.layers[0].mlp
    assert mlp.forward.__func__ is fused_lora._recompute_forward
    assert mlp._mlp_inner_forward.__func__ is tiled_mlp._tiled_forward

    def rebound(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    mlp.__dict__["forward"] = types.MethodType(rebound, mlp)  # what liger's _bind_method_to_module does
    fused_lora.rewrap(model)
    assert mlp.forward.__func__ is fused_lora._recompute_forward
    assert mlp._mlp_inner_forward.__func__ is tiled_mlp._tiled_forward
    assert mlp._untiled_forward.__func__ is rebound
    fused_lora.rewrap(model)  # idempotent
    assert mlp._untiled_forward.__func__ is rebound and mlp._mlp_inner_forward.__func__ is tiled_mlp._tiled_forward


def test_recomputing_mlps_follow_each_batch(smoke_run, tmp_path):
    """checkpoint_per_batch with MLP recompute: the plan's function carries `mlp`, the MLPs that
    recompute for a batch of that length (the last ones); the trainer sets them before each step
    and counts steps by (layers, MLPs); losses and gradient norms equal a run without."""
    from lorastudio.core import fused_lora

    torch.set_num_threads(1)
    cfg = _cfg(smoke_run, "lora")
    cfg.training.fused_lora = True
    cfg.training.max_steps, cfg.training.logging_steps, cfg.training.micro_batch_size = 6, 1, 2
    cfg.training.grad_accum, cfg.training.save_steps = 1, 10 ** 6
    tokenizer, template, _m, new_ids = train_lib.load_tokenizer_and_template(cfg)
    train_ds, *_ = train_lib.prepare_data(cfg, tokenizer, template)
    sizes = sorted(len(r["input_ids"]) for r in train_ds)
    cut = sizes[len(sizes) // 2] * 2
    out, calls = {}, []
    apply = fused_lora.LoRAMLP.apply
    fused_lora.LoRAMLP.apply = lambda *a: calls.append(1) or apply(*a)
    try:
        for by_batch in (False, True):
            torch.manual_seed(0)
            cfg.training.gradient_checkpointing = by_batch
            cfg.training.mlp_recompute = "all" if by_batch else 0
            model = model_lib.load_for_training(cfg, tokenizer, new_ids)
            trainer = train_lib.build_trainer(cfg, tmp_path / f"mlp-{by_batch}", model, tokenizer, template,
                                              train_ds, None)
            if by_batch:
                layers = lambda n: 1 if n > 2 * cut else 0  # noqa: E731
                layers.mlp = lambda n: 3 if n > cut else 0
                trainer.checkpoint_by_batch(layers)
            trainer.train()
            hist = [h for h in trainer.state.log_history if "loss" in h]
            out[by_batch] = ([h["loss"] for h in hist], [h["grad_norm"] for h in hist])
    finally:
        fused_lora.LoRAMLP.apply = apply
    assert set(trainer.checkpointed) <= {"0+0m", "0+3m", "1+3m"} and "0+0m" in trainer.checkpointed
    assert sum(trainer.checkpointed.values()) == 6 and len(calls) % 3 == 0 and calls, trainer.checkpointed
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    assert out[True][1] == pytest.approx(out[False][1], rel=1e-5)
