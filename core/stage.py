"""The training stage (config `stage:`): what each preference stage needs from the config, and the
values resolve() fills for it. Torch-free: the config validator and the web app import it.

Trainers (TRL 1.16.0, core/preference.py): dpo -> trl.DPOTrainer and kto -> trl.KTOTrainer
(stable); orpo -> trl.experimental.orpo.ORPOTrainer and simpo -> trl.experimental.cpo.CPOTrainer
with loss_type simpo (trl.experimental: APIs that may change between TRL releases).
"""

from __future__ import annotations

import json
from pathlib import Path

PAIRED = ("dpo", "orpo", "simpo")  # stages that train on (chosen, rejected) pairs
TRAINERS = {"dpo": "trl.DPOTrainer", "kto": "trl.KTOTrainer", "orpo": "trl.experimental.orpo.ORPOTrainer",
            "simpo": "trl.experimental.cpo.CPOTrainer (loss_type simpo)"}
EXPERIMENTAL = ("orpo", "simpo")
# preference.loss_type by stage (TRL's names); the first is what auto means
LOSSES = {
    "dpo": ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
            "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop"),
    "kto": ("kto", "apo_zero_unpaired"),
    "simpo": ("simpo",),
    "orpo": ("orpo",),
}
# LoRA knobs of a parent adapter (adapter_config.json key -> lora section field)
_PARENT_LORA = {"r": "r", "lora_alpha": "alpha", "target_modules": "target_modules", "use_dora": "use_dora",
                "use_rslora": "use_rslora"}


def check(cfg) -> None:
    """Combinations no preference run can take (raised as ValueError inside the config validator,
    which names the field)."""
    p, t = cfg.preference, cfg.training
    if cfg.model.adapter_from and cfg.method == "full":
        raise ValueError("model.adapter_from: continues a LoRA/QLoRA adapter; use method lora or qlora")
    if cfg.stage == "sft":
        return
    if cfg.template.packing:
        raise ValueError(f"template.packing: not with stage {cfg.stage} (each answer is scored as its own row)")
    allowed = LOSSES[cfg.stage] + (("sft",) if cfg.stage == "dpo" else ())
    parts = p.loss_type.split("+")
    if p.loss_type != "auto" and (not all(x in allowed for x in parts) or (len(parts) > 1 and cfg.stage != "dpo")):
        raise ValueError(f"preference.loss_type: {p.loss_type!r} is not a {cfg.stage} loss; use auto or one of "
                         f"{', '.join(LOSSES[cfg.stage])}" + (" (dpo: several joined by +, e.g. sigmoid+sft)"
                                                                if cfg.stage == "dpo" else ""))
    if cfg.stage == "kto" and t.micro_batch_size < 2:
        raise ValueError("training.micro_batch_size: KTO needs 2 or more (its KL term pairs each answer "
                         "with another row's prompt in the same micro-batch)")
    if p.reference_free and cfg.stage != "dpo":
        raise ValueError(f"preference.reference_free: a DPO setting (stage {cfg.stage} "
                         f"{'has no reference model' if cfg.stage in EXPERIMENTAL else 'needs its reference'})")


def parent_adapter(path: str) -> Path:
    """model.adapter_from -> the adapter folder: a run folder (its adapter/), an adapter folder or
    a checkpoint-N/; a bare name is looked up among the workspace's runs."""
    from . import workspace
    from .errors import ConfigError

    given = Path(path).expanduser()
    tries = [given] if given.is_absolute() or given.exists() else [given, workspace.runs_dir() / path]
    for base in tries:
        for cand in (base / "adapter", base):
            if (cand / "adapter_config.json").is_file():
                return cand.resolve()
    raise ConfigError(f"model.adapter_from: no LoRA adapter at {path} (give a finished LoRA/QLoRA run's folder, "
                      "its adapter/ or a checkpoint-N/ in it)")


def _parent_config(adapter: Path) -> dict:
    from . import safe_io

    for cfg_path in (adapter.parent / "config.yaml", adapter.parent.parent / "config.yaml"):
        if cfg_path.is_file():
            try:
                return safe_io.read_yaml(cfg_path) or {}
            except safe_io.FileProblem:
                return {}
    return {}


def resolve(cfg) -> None:
    """Fill the stage's values in place (core.resolve, before the machine-dependent autos): the
    loss type, the parent adapter's folder and its LoRA shape, and the fast-path settings the
    preference trainers cannot take (they pad both answers of a pair and score each one)."""
    from . import tiny
    from .errors import ConfigError

    t, p = cfg.training, cfg.preference
    if cfg.model.adapter_from:
        adapter = parent_adapter(cfg.model.adapter_from)
        cfg.model.adapter_from = str(adapter)
        parent = _parent_config(adapter)
        base = (parent.get("model") or {}).get("name_or_path")
        if base and tiny.pin(base) != tiny.pin(cfg.model.name_or_path) and base != cfg.model.name_or_path:
            raise ConfigError(f"model.adapter_from: {adapter} was trained on {base}, not {cfg.model.name_or_path}; "
                              "set model.name_or_path to its base")
        ac = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        for key, field in _PARENT_LORA.items():  # the adapter trains on: its shape is the parent's
            value = ac.get(key)
            if value is not None:
                setattr(cfg.lora, field, sorted(value) if isinstance(value, (list, set)) else value)
    if cfg.stage == "sft":
        return
    if p.loss_type == "auto":
        p.loss_type = LOSSES[cfg.stage][0]
    # a pair is compared on its final answers: earlier turns are context
    cfg.template.train_on = "last"
    for name, off in (("fused_lora", False), ("tiled_mlp", False), ("mlp_recompute", 0),
                      ("checkpoint_per_batch", False), ("kernels", "off")):
        value = getattr(t, name)
        if value == "auto":
            setattr(t, name, off)
        elif value not in (off, False, 0):
            raise ConfigError(f"training.{name}: not with stage {cfg.stage} yet (TRL's preference trainers "
                              f"run their own forward); use auto")
    if cfg.template.padding_free in ("auto", True):
        cfg.template.padding_free = False  # the pair collators pad (TRL: padding-free DPO is unavailable)


def for_estimate(cfg):
    """The config the memory estimate reads for a preference stage: a micro-batch of N pairs
    holds 2N sequences with activations (dpo, orpo, simpo; KTO's KL rows and every reference
    forward run without a graph, so their activations are freed layer by layer: counted as none).
    The reference forward costs time (one forward of each sequence, ~1/3 of a step), not memory;
    full fine-tuning's reference copy is added by core.estimate. The parent adapter is not read."""
    cfg = cfg.model_copy(deep=True)
    cfg.model.adapter_from = None
    if cfg.stage in PAIRED:
        cfg.training.micro_batch_size *= 2
    return cfg
