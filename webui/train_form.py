"""The Train tab's form. FORM is the one table of its fields: the /start parameter name, where the
value lands in config.yaml, the label (with its one line of advice), the kind of value and the
layout row. Defaults are the config's own (RunConfig), so the empty form, a preset and
`lorastudio train` start from the same values; the components, preset_form() and build_config()
are all read from this table."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import yaml

from .helpers import number, parse_columns, parse_sources, preset_names, readable, whole


@dataclass(frozen=True)
class Field:
    name: str  # the /start API parameter and the component's key
    path: str  # dotted config path
    label: str
    kind: str  # int | float | bool | text | lines | modules | choice | optional_int | optional_float | optional_text
    row: int  # layout row in the "Training options" accordion
    choices: tuple = ()
    elem_id: str | None = None


# in the order /start takes them (an API: new fields go at the end); `row` places them on the page
FORM: tuple[Field, ...] = (
    Field("method", "method", "Method", "choice", 0, ("lora", "qlora", "full")),
    Field("lora_r", "lora.r", "LoRA r (8-64 typical; higher = more capacity, more memory)", "int", 1),
    Field("lora_alpha", "lora.alpha", "LoRA alpha (scale = alpha / r)", "float", 1),
    Field("lora_dropout", "lora.dropout", "LoRA dropout (0 is fastest; 0.05-0.1 on tiny datasets)", "float", 1),
    Field("lora_targets", "lora.target_modules", "Target modules (all-linear or q_proj, v_proj, ...)", "modules", 1),
    Field("use_dora", "lora.use_dora", "DoRA", "bool", 1),
    Field("use_rslora", "lora.use_rslora", "rsLoRA", "bool", 1),
    Field("quant_bits", "quantization.bits", "Quantization bits (QLoRA)", "choice", 0, (4, 8)),
    Field("learning_rate", "training.learning_rate", "Learning rate", "float", 2),
    Field("epochs", "training.epochs", "Epochs", "float", 2),
    Field("max_steps", "training.max_steps", "Max steps (-1 = by epochs)", "int", 2, elem_id="max-steps"),
    Field("micro_batch_size", "training.micro_batch_size", "Micro-batch size (lower it first when out of memory)",
          "int", 2),
    Field("grad_accum", "training.grad_accum", "Gradient accumulation (effective batch = micro-batch x this)",
          "int", 2),
    Field("packing", "template.packing", "Packing", "bool", 3),
    Field("eval_split", "data.eval_split", "Eval split (fraction held out; 0 = none)", "float", 3),
    Field("eval_steps", "training.eval_steps", "Eval every (steps)", "int", 3),
    Field("save_steps", "training.save_steps", "Save every (steps)", "int", 3),
    Field("sample_every", "training.sample_every", "Sample every (steps, 0 = at the end)", "int", 3),
    Field("sample_prompts", "training.sample_prompts", "Sample prompts (one per line)", "lines", 5),
    Field("run_name", "output.run_name", "Run name (optional)", "optional_text", 0),
    Field("early_stopping", "training.early_stopping_patience",
          "Early stopping: evals without a better eval loss (0 = off; needs an eval split)", "optional_int", 3),
    Field("gpus", "training.gpus", "GPUs (1 = this process; more starts `accelerate launch`)", "int", 4),
    Field("strategy", "training.strategy", "Multi-GPU strategy (ddp: a copy per GPU; fsdp/zero3 shard the model; "
          "zero2/zero3 need DeepSpeed)", "choice", 4, ("ddp", "fsdp", "zero2", "zero3")),
    Field("offload", "training.offload", "Offload params/optimizer to CPU RAM (fsdp/zero only)", "bool", 4),
    Field("gpu_memory", "training.gpu_memory_gib", "GPU memory budget (GiB; 0 = the card's free memory; auto "
          "settings trade speed for memory to fit it)", "optional_float", 4),
    Field("train_on", "template.train_on", "Train on (every assistant answer, or the last only)", "choice", 6,
          ("all", "last")),
    Field("reasoning", "template.reasoning", "Reasoning in earlier answers (auto: as the template does; keep; strip)",
          "choice", 6, ("auto", "keep", "strip")),
    Field("system_role", "template.system", "System message where the template has none (auto/fold: into the "
          "first user turn; refuse: skip the row)", "choice", 6, ("auto", "fold", "refuse")),
    # preference training (core/stage.py): the stage, the SFT run it continues, the stage's knobs
    Field("stage", "stage", "Stage (sft: supervised; dpo/orpo/simpo: chosen vs rejected pairs; kto: answers "
          "labelled good/bad)", "choice", 7, ("sft", "dpo", "orpo", "simpo", "kto"), elem_id="stage"),
    Field("adapter_from", "model.adapter_from", "Continue from run (a finished LoRA run's folder or name; "
          "preference stages use it as the reference)", "optional_text", 7, elem_id="adapter-from"),
    Field("pref_beta", "preference.beta", "Beta (0.1 usual; higher = stay closer to the reference; SimPO 2-10)",
          "float", 8),
    Field("pref_loss_type", "preference.loss_type", "Loss type (auto: the stage's own; dpo: sigmoid, ipo, hinge, "
          "robust, ...; sigmoid+sft keeps chosen answers likely; kto: kto, apo_zero_unpaired)", "text", 8),
    Field("pref_label_smoothing", "preference.label_smoothing", "Label smoothing (noisy labels; 0.1 with robust)",
          "float", 8),
    Field("pref_reference_free", "preference.reference_free", "Reference-free (DPO)", "bool", 8),
    Field("pref_simpo_gamma", "preference.simpo_gamma", "SimPO gamma (target margin, 0.5-1.5)", "float", 9),
    Field("pref_desirable_weight", "preference.desirable_weight", "KTO desirable weight", "float", 9),
    Field("pref_undesirable_weight", "preference.undesirable_weight", "KTO undesirable weight", "float", 9),
    Field("report_to", "training.report_to", "Also log to (none: metrics.jsonl only; tensorboard: RUN_DIR/tensorboard; "
          "trackio: a local dashboard; these two need the [track] extra)", "choice", 4,
          ("none", "tensorboard", "trackio", "wandb", "mlflow"), elem_id="report-to"),
)
FORM_NAMES = [f.name for f in FORM]
FIELDS = {f.name: f for f in FORM}
# what the other tabs contribute to a run (their components, in this order after the preset)
CONTEXT = ["model", "trust_remote_code", "data", "fmt", "columns", "template", "custom_jinja", "cutoff"]


def _get(d: dict, path: str):
    for p in path.split("."):
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _set(d: dict, path: str, value) -> None:
    parts = path.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def to_form(f: Field, value):
    """A config value as the form shows it."""
    if f.kind == "modules":
        return value if isinstance(value, str) else ", ".join(value)
    if f.kind == "lines":
        return "\n".join(value or [])
    if f.kind in ("optional_int", "optional_float"):
        return value or 0
    if f.kind == "optional_text":
        return value or ""
    if f.name == "quant_bits":
        return value or 4  # what QLoRA uses when the config leaves it unset
    return value


def from_form(f: Field, value):
    """A form value as the config takes it; ValueError naming the field for a bad number."""
    label = f.label.split(" (")[0]
    if f.kind == "modules":
        v = str(value).strip() or "all-linear"
        return v if v == "all-linear" else [t.strip() for t in v.split(",") if t.strip()]
    if f.kind == "lines":
        return [line.strip() for line in str(value).splitlines() if line.strip()]
    if f.kind == "optional_text":
        return str(value).strip() or None
    if f.kind == "optional_int":
        return whole(value, label) or None  # 0 = off
    if f.kind == "optional_float":
        return number(value, label) or None
    if f.kind == "int":
        return whole(value, label)
    if f.kind == "float":
        return number(value, label)
    if f.kind == "bool":
        return value  # the config's own validation reads "false" and 0 as it should
    return value if f.name == "quant_bits" else str(value)


@functools.lru_cache(maxsize=1)
def defaults() -> dict:
    """The form as the config's defaults fill it."""
    from lorastudio.core import config as config_lib

    cfg = config_lib.RunConfig().model_dump(mode="json")
    return {f.name: to_form(f, _get(cfg, f.path)) for f in FORM}


def preset_dict(preset: str | None) -> dict:
    from lorastudio import presets

    if not preset:
        return {}
    path = presets.find(preset)
    if path is None:
        raise ValueError(f"no preset {preset!r} (choose one of {', '.join(preset_names())})")
    return yaml.safe_load(path.read_text()) or {}


def preset_form(preset: str) -> dict:
    """Form values (FORM names + CONTEXT names) for a preset: its values over the RunConfig defaults."""
    from lorastudio.core import config as config_lib

    cfg = config_lib.from_dict(preset_dict(preset), preset).model_dump(mode="json")
    out = {f.name: to_form(f, _get(cfg, f.path)) for f in FORM}
    src = cfg["data"]["sources"]
    out.update(model=cfg["model"]["name_or_path"], trust_remote_code=cfg["model"]["trust_remote_code"],
               data="\n".join(s["path"] + (f" | {s['ratio']}" if s.get("ratio", 1.0) != 1.0 else "") for s in src),
               fmt=src[0].get("format", "auto"), columns=", ".join(f"{k}={v}" for k, v in (src[0].get("columns") or {}).items()),
               template=cfg["template"]["name"], custom_jinja=cfg["template"]["custom_jinja"] or "",
               cutoff=cfg["template"]["cutoff_len"])
    return out


def build_config(preset: str | None, values: dict):
    """RunConfig from a preset (or the defaults) with the form VALUES over it (missing keys keep
    the preset's value). Raises ConfigError/ValueError with a readable message."""
    from lorastudio.core import config as config_lib

    data = preset_dict(preset)
    for f in FORM:
        if f.name in values and values[f.name] is not None and f.name != "quant_bits":  # bits: with the method
            _set(data, f.path, from_form(f, values[f.name]))
    method = values.get("method") or data.get("method", "lora")
    if method == "qlora":
        _set(data, "quantization.bits", whole(values.get("quant_bits") or 4, "Quantization bits"))
    elif "quant_bits" in values:
        _set(data, "quantization.bits", None)
    if values.get("model"):
        _set(data, "model.name_or_path", readable(values["model"]))
    if "/" in str(values.get("adapter_from") or ""):  # a folder (a bare name is a run of this workspace)
        _set(data, "model.adapter_from", readable(values["adapter_from"]))
    if values.get("trust_remote_code") is not None:
        _set(data, "model.trust_remote_code", bool(values["trust_remote_code"]))
    if values.get("data"):
        cols = parse_columns(values.get("columns") or "")
        sources = []
        for s in parse_sources(values["data"]):
            s["path"] = readable(s["path"])
            s["format"] = s.get("format") or values.get("fmt") or "auto"
            if cols:
                s["columns"] = cols
            sources.append(s)
        _set(data, "data.sources", sources)
    if values.get("template"):
        _set(data, "template.name", values["template"])
        _set(data, "template.custom_jinja", (values.get("custom_jinja") or None) if values["template"] == "custom"
             else None)
    if values.get("cutoff"):
        _set(data, "template.cutoff_len", whole(values["cutoff"], "Cutoff length"))
    return config_lib.from_dict(data, f"preset {preset}" if preset else "the form")


def with_form_signature(fn):
    """FN(preset, values: dict) as an event handler taking (preset, *CONTEXT, *FORM) by name: the
    /start API's parameters are the table's names, in the order of the components. A parameter
    left out (None) keeps the preset's value."""
    names = ["preset"] + CONTEXT + FORM_NAMES

    @functools.wraps(fn)
    def handler(*args, **kwargs):
        values = dict(zip(names, args))
        values.update(kwargs)
        preset = values.pop("preset", None)
        return fn(preset or None, values)

    params = [inspect.Parameter("preset", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in names[1:]]
    handler.__signature__ = inspect.Signature(params)
    return handler


def components() -> dict:
    """The form's Gradio components, laid out by row (called inside the tab's accordion)."""
    import gradio as gr

    values, out = defaults(), {}
    for row in sorted({f.row for f in FORM}):
        with gr.Row():
            for f in (f for f in FORM if f.row == row):
                kw = {"label": f.label, "value": values[f.name], "elem_id": f.elem_id}
                if f.kind == "bool":
                    out[f.name] = gr.Checkbox(**kw)
                elif f.kind == "choice":
                    out[f.name] = (gr.Radio if f.name == "method" else gr.Dropdown)(list(f.choices), **kw)
                elif f.kind in ("int", "optional_int"):
                    out[f.name] = gr.Number(precision=0, **kw)
                elif f.kind in ("float", "optional_float"):
                    out[f.name] = gr.Number(**kw)
                else:
                    out[f.name] = gr.Textbox(lines=2 if f.kind == "lines" else 1, **kw)
    return out
