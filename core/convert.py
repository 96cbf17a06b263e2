"""Export and merge a run's adapter (the child that runs them: core.convert_job,
`python -m lorastudio.core.convert_job RUN_DIR [--checkpoint N] [--merge] [--gguf TYPE] [--out DIR]`).

    export_adapter -> RUN_DIR/export-adapter[-ckptN]/  standard PEFT folder + tokenizer (the run's
                      chat template) + lorastudio.json
    merge          -> RUN_DIR/merged[-ckptN]/          full model (safetensors, sharded when large),
                      tokenizer, generation_config (stops at the template's end of turn),
                      verification.json (merged vs base+adapter logits)

A QLoRA run is merged into a base reloaded in 16/32-bit, never into 4-bit weights (rounding the
merged weights back to 4 bits would lose the adapter). Outputs are written to OUT.partial and
renamed at the end, so an existing OUT is always a complete one, and it is never overwritten.

Like training, this runs as a child (own process group, output to RUN_DIR/convert.log) and
reports through RUN_DIR/metrics.jsonl: convert_start, convert_end, convert_failed.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path

from . import runs

DTYPE_ALIASES = {"auto": "auto", "fp32": "float32", "float32": "float32", "bf16": "bfloat16",
                 "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}
# Fixed conversations for the verification: the assistant turns are included, so the positions
# the adapter was trained on are compared too.
VERIFY_PROMPTS = [
    ("What is your name?", "My name is Lumen."),
    ("Hello!", "Hello! How can I help?"),
    ("What is 2 plus 3?", "2 plus 3 is 5."),
    ("Spell book in capitals.", "BOOK"),
    ("Explain LoRA in one sentence.", "LoRA trains small low-rank matrices."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Write a haiku about the sea.", "Waves fold into foam."),
    ("Who made you?", "I was made by LoRA Studio."),
]


class ConvertError(ValueError):
    """Bad input: not a run, no such checkpoint, the output exists..."""


def log(msg: str) -> None:
    print(f"[lorastudio {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- what a run holds

def adapter_dir(run_dir: str | Path, checkpoint: int | None = None) -> Path:
    """The folder with the adapter weights: RUN_DIR/adapter, or RUN_DIR/checkpoint-N."""
    run_dir = Path(run_dir)
    src = run_dir / (f"checkpoint-{checkpoint}" if checkpoint is not None else "adapter")
    if not (src / "adapter_config.json").exists():
        have = [c.path.name for c in runs.checkpoints(run_dir) if c.adapter]
        if (run_dir / "model").is_dir() and checkpoint is None:
            raise ConvertError(f"{run_dir} is a full fine-tune: {run_dir / 'model'} is already a full model")
        raise ConvertError(f"no adapter in {src}" + (f" (checkpoints: {', '.join(have)})" if have else ""))
    return src


def run_config(run_dir: str | Path):
    from . import config as config_lib

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ConvertError(f"{run_dir} is not a run directory (no config.yaml)")
    return config_lib.load(path)


def run_tokenizer(run_dir: str | Path):
    """(tokenizer, template, meta) exactly as training used them. RUN_DIR/adapter holds the
    tokenizer (added tokens included) with the template source, and lorastudio.json the template's
    name, end-of-turn token and stop strings; a run without adapter/ (failed or stopped before
    saving) is rebuilt from its config, the same way training built it."""
    from . import templates

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    final = run_dir / ("model" if cfg.method == "full" else "adapter")
    if (final / "lorastudio.json").exists():
        tokenizer, template, meta = folder_tokenizer(final)
        if template is not None:
            return tokenizer, template, meta
    from .train import load_tokenizer_and_template

    tokenizer, template, missing, _ = load_tokenizer_and_template(cfg)
    tokenizer.chat_template = template.source
    meta = {"base_model": cfg.model.name_or_path, "method": cfg.method, "template": template.name,
            "eot_token": template.eot_token, "stop_strings": template.stop_strings, "added_tokens": missing}
    return tokenizer, templates._copy(template), meta


def folder_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    """(tokenizer, template or None, meta) for an adapter/merged/model folder. lorastudio.json names
    the template the folder was trained with; a plain model folder gets its own (auto) template;
    a tokenizer without a chat template gets None (plain completion)."""
    from . import model as model_lib
    from . import templates

    folder = Path(folder)
    tokenizer = model_lib.load_tokenizer(str(folder), trust_remote_code=trust_remote_code)
    meta_path = folder / "lorastudio.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    source = templates._own_source(tokenizer)
    if not source:
        return tokenizer, None, meta
    if meta.get("template"):
        return tokenizer, templates.ChatTemplate(meta["template"], source, eot_token=meta.get("eot_token"),
                                                 stop_strings=list(meta.get("stop_strings") or [])), meta
    try:
        return tokenizer, templates.resolve_template(tokenizer, "auto"), meta
    except templates.TemplateError:
        # chat needs only rendering, not trained spans: keep the model's own template as it is
        return tokenizer, templates.ChatTemplate("auto", source), meta


def default_out(run_dir: Path, kind: str, checkpoint: int | None) -> Path:
    return run_dir / (kind + (f"-ckpt{checkpoint}" if checkpoint is not None else ""))


def _claim(out: Path) -> Path:
    """Refuse an existing OUT; return the temporary folder to write into."""
    if out.exists():
        raise ConvertError(f"{out} already exists; not overwriting (choose another --out or delete it)")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted conversion
    tmp.mkdir(parents=True)
    return tmp


def _write_meta(folder: Path, meta: dict, **extra) -> None:
    (folder / "lorastudio.json").write_text(json.dumps({**meta, **extra}, indent=2, default=str))


# ---------------------------------------------------------------- export

def export_adapter(run_dir: str | Path, checkpoint: int | None = None, out: str | Path | None = None) -> Path:
    """A standard PEFT folder: adapter weights (trainable token rows included), config, tokenizer
    with the run's chat template, lorastudio.json."""
    run_dir = Path(run_dir).resolve()
    src = adapter_dir(run_dir, checkpoint)
    out = Path(out).resolve() if out else default_out(run_dir, "export-adapter", checkpoint)
    tokenizer, template, meta = run_tokenizer(run_dir)
    tmp = _claim(out)
    try:
        for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"):
            if (src / name).exists():
                shutil.copyfile(src / name, tmp / name)
        tokenizer.chat_template = template.source
        tokenizer.save_pretrained(tmp)
        _write_meta(tmp, meta, source=str(src), checkpoint=checkpoint, step=checkpoint or meta.get("step"))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"adapter exported to {out}")
    return out


# ---------------------------------------------------------------- merge

def base_dtype(path: str, trust_remote_code: bool = False) -> str:
    """The dtype the base model's config declares (float32 when it declares none)."""
    from transformers import AutoConfig

    dt = getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), "dtype", None)
    name = str(dt).replace("torch.", "") if dt is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def load_base(cfg, dtype: str, device: str, tokenizer, quantized: bool = False):
    """The run's base model in `dtype` on `device` (or 4-bit as trained), resized for added tokens."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from . import model as model_lib

    path = model_lib.resolve_path(cfg.model.name_or_path)
    kwargs: dict = dict(dtype=model_lib.torch_dtype(dtype), revision=cfg.model.revision,
                        trust_remote_code=cfg.model.trust_remote_code)
    if quantized:
        q = cfg.quantization
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                               bnb_4bit_use_double_quant=q.double_quant,
                               bnb_4bit_compute_dtype=kwargs["dtype"], bnb_4bit_quant_storage=kwargs["dtype"])
            if q.bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": 0 if device == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not quantized:
        model = model.to(device)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        # template tokens added by training: same shape as trained (their rows come from the adapter)
        model.resize_token_embeddings(len(tokenizer))
    model.eval()
    return model


def _texts(tokenizer, template) -> list[str]:
    if template is None:
        return [f"{q}\n{a}" for q, a in VERIFY_PROMPTS]
    return [template.render([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                            tokenizer=tokenizer) for q, a in VERIFY_PROMPTS]


def logits_on(model, tokenizer, texts: list[str]) -> list:
    """Float32 CPU logits for every position of every text (one at a time: no padding effects)."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            out.append(model(input_ids=ids).logits[0].float().cpu())
    return out


def compare(a: list, b: list) -> dict:
    import torch

    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    agree = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b))
    total = sum(x.shape[0] for x in a)
    return {"max_abs_logit_diff": diff, "top1_agreement": agree / total, "positions": total,
            "finite": bool(all(torch.isfinite(x).all() for x in b))}


def _free() -> None:
    """Give back the memory of models the caller has just dropped (GPU memory too)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def merge(run_dir: str | Path, checkpoint: int | None = None, dtype: str = "auto", out: str | Path | None = None,
          device: str = "auto") -> dict:
    """Merge the adapter into a 16/32-bit base, save it, verify it; returns the report."""
    import torch
    from peft import PeftModel

    from . import model as model_lib
    from .generate import eos_ids

    run_dir = Path(run_dir).resolve()
    src = adapter_dir(run_dir, checkpoint)
    if dtype not in DTYPE_ALIASES:
        raise ConvertError(f"--dtype: {dtype!r} is not one of auto, float32/fp32, bfloat16/bf16, float16/fp16")
    cfg = run_config(run_dir)
    tokenizer, template, meta = run_tokenizer(run_dir)
    base_path = model_lib.resolve_path(cfg.model.name_or_path)
    dtype = DTYPE_ALIASES[dtype]
    if dtype == "auto":
        dtype = base_dtype(base_path, cfg.model.trust_remote_code)
    out = Path(out).resolve() if out else default_out(run_dir, "merged", checkpoint)
    tmp = _claim(out)
    texts = _texts(tokenizer, template)
    report: dict = {"run_dir": str(run_dir), "adapter": str(src), "checkpoint": checkpoint, "out": str(out),
                    "method": cfg.method, "base_model": cfg.model.name_or_path, "dtype": dtype}
    gpu_lock = None
    try:
        want_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        if want_cuda:  # one GPU job at a time: wait behind a training run (visible in convert.log)
            from .locks import DeviceLock

            gpu_lock = DeviceLock("cuda", "merge", run_dir)
            gpu_lock.acquire(wait=True, on_wait=lambda pos, holder: log(
                f"waiting for the GPU: position {pos}, held by {(holder or {}).get('run_dir') or 'another job'}"))
        for dev in (["cuda", "cpu"] if want_cuda else ["cpu"]):
            try:
                log(f"loading the base ({dtype}, {dev}) and the adapter from {src}")
                model = PeftModel.from_pretrained(load_base(cfg, dtype, dev, tokenizer), str(src))
                model.eval()
                reference = logits_on(model, tokenizer, texts)  # base + adapter, unmerged
                log("merging (merge_and_unload)")
                merged = model.merge_and_unload()
                break
            except torch.OutOfMemoryError:
                if dev == "cpu":
                    raise
                log("out of GPU memory while merging: retrying on CPU")
                model = merged = None
                _free()
        report["device"] = dev
        merged.generation_config.eos_token_id = eos_ids(tokenizer, template)  # template eot, then EOS
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
        merged.config.use_cache = True
        log(f"saving to {out}")
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="4GB")
        tokenizer.chat_template = template.source if template is not None else None
        tokenizer.save_pretrained(tmp)
        _write_meta(tmp, meta, merged_from=str(src), checkpoint=checkpoint, step=checkpoint or meta.get("step"),
                    dtype=dtype)
        del model, merged
        _free()

        # Verify what was written, reloaded with plain transformers, against base + adapter.
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=model_lib.torch_dtype(dtype)).to(dev).eval()
        merged_logits = logits_on(reloaded, tokenizer, texts)
        del reloaded
        _free()
        v = {"vs_base_plus_adapter": compare(reference, merged_logits)}
        v["criterion"] = "max |dlogit| <= 1e-4" if dtype == "float32" else "top-1 agreement >= 99%"
        first = v["vs_base_plus_adapter"]
        v["passed"] = first["finite"] and (first["max_abs_logit_diff"] <= 1e-4 if dtype == "float32"
                                           else first["top1_agreement"] >= 0.99)
        if cfg.method == "qlora":
            # The model that was actually trained: the 4-bit base + the adapter. Quantization error
            # makes these differ; the figures say by how much.
            log("loading the 4-bit base + adapter that was trained, for comparison")
            qdev = dev if dev == "cuda" else "cpu"
            qmodel = PeftModel.from_pretrained(load_base(cfg, cfg.model.dtype, qdev, tokenizer, quantized=True), str(src))
            v["vs_4bit_base_plus_adapter"] = compare(logits_on(qmodel.eval(), tokenizer, texts), merged_logits)
            del qmodel
            _free()
        report["verification"] = v
        # every verification.json says at its top whether it passed, next to its figures
        (tmp / "verification.json").write_text(json.dumps({"passed": v["passed"], **report}, indent=2))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if gpu_lock is not None:
            gpu_lock.release()
    for name, figs in v.items():
        if isinstance(figs, dict):
            log(f"verification {name}: max |dlogit| {figs['max_abs_logit_diff']:.3e}, "
                f"top-1 agreement {figs['top1_agreement']:.2%} over {figs['positions']} positions")
    log(f"verification {'PASSED' if v['passed'] else 'FAILED'} ({v['criterion']}, {dtype})")
    return report
