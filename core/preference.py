"""Preference training in the training child (core/train.py's spine, stage != sft): the data of a
preference file labelled by core.labels, TRL's trainer for the stage (core/stage.py names them),
and the reference model.

The reference, LoRA/QLoRA. A fresh adapter: the base with the adapter disabled (TRL's own PEFT
path; no second copy of the model). Continuing an SFT run (model.adapter_from): its adapter is
loaded as the trained one ("default") and TRL keeps a frozen copy of it as a second adapter
("ref") that the reference forward switches to: the reference is base + the SFT adapter at a
cost of one adapter's memory, and the saved adapter/ is an ordinary adapter of the base that
chat, merge and convert load as they load any run's. (Merging the SFT adapter into the base
instead would make the new adapter a delta on a merged base no other part of the studio knows;
a 4-bit base cannot take a merge without a dequantised copy.) Full fine-tuning: TRL loads an
explicit reference copy. ORPO and SimPO have no reference.

Batches come from our own collators: each side's trained tokens are the labelling function's
mask (a trailing newline after <|im_end|> is not an answer token), not TRL's prompt/completion
split of its own tokenisation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from . import stage as stage_lib


# ---------------------------------------------------------------- data

def prepare_data(cfg, tokenizer, template, held_out=None):
    """core.train.prepare_data for a preference stage: (train, eval, stats, reports, hash)."""
    from . import data as data_lib
    from . import preference_data, tiny

    want = "kto" if cfg.stage == "kto" else "preference"
    sources = [s.model_dump() for s in cfg.data.sources]
    examples, reports = [], []
    for i, s in enumerate(sources):
        s["path"] = tiny.resolve_data(s["path"])
        rows, report = preference_data.load_file(s["path"], s["format"], s.get("columns"), s.get("placeholders"),
                                                 want=want)
        copies, rest = divmod(round(s["ratio"] * len(rows)), len(rows))
        rng = random.Random(f"{cfg.data.seed}:{i}")  # a stream per source, as core.data.load_mixture
        examples += rows * copies + [rows[j] for j in sorted(rng.sample(range(len(rows)), rest))]
        reports.append(report)
    if not examples:
        raise data_lib.DataError("the mixture is empty (every ratio rounds to 0 rows)")
    random.Random(cfg.data.seed).shuffle(examples)
    from .distributed import planned_steps

    planned_steps(cfg, round(len(examples) * (1 - cfg.data.eval_split)))
    ds, stats = preference_data.tokenize(examples, tokenizer, template, cfg.template.cutoff_len)
    if stats.kept == 0 and stats.refused:
        raise data_lib.DataError(f"the chat template refused every row; the first: {stats.refusals[0]}")
    if stats.kept == 0:
        raise data_lib.DataError("no row has a trained answer token after truncation: raise template.cutoff_len "
                                 f"(now {cfg.template.cutoff_len})")
    if cfg.stage == "kto" and (stats.desirable == 0 or stats.undesirable == 0):
        raise data_lib.DataError(f"KTO needs answers labelled true and false; this data has {stats.desirable} "
                                 f"true and {stats.undesirable} false")
    eval_ds = None
    if cfg.data.eval_split > 0 and len(ds) >= 10:
        split = ds.train_test_split(test_size=cfg.data.eval_split, seed=cfg.data.seed)
        ds, eval_ds = split["train"], split["test"]
    return ds, eval_ds, stats, reports, data_lib.dataset_hash(sources)


def rows_per_example(cfg) -> int:
    """Sequences a micro-batch row costs activations for: a pair's two answers (KTO's KL rows
    and every reference forward run without a graph)."""
    return 2 if cfg.stage in stage_lib.PAIRED else 1


# ---------------------------------------------------------------- the parent adapter

def load_parent(cfg, model) -> int:
    """model.adapter_from: its weights into the adapter being trained (same shape: core.stage
    copied its LoRA settings) -> the tensors loaded."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .config import ConfigError

    folder = Path(cfg.model.adapter_from)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"model.adapter_from: {folder} has no adapter_model.safetensors")
    state = load_file(str(weights))
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ConfigError(f"model.adapter_from: {len(unexpected)} tensors of {folder} fit no layer of this model "
                          f"(first: {unexpected[0]}); was it trained on model.name_or_path?")
    return len(state)


def drop_reference(model) -> None:
    """The frozen "ref" copy of a parent adapter is no part of the result (adapter/ holds one)."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


# ---------------------------------------------------------------- collators

def _pad(rows: list[list[int]], value: int, multiple: int):
    import torch

    longest = max(len(r) for r in rows)
    longest = -(-longest // multiple) * multiple
    return torch.tensor([r + [value] * (longest - len(r)) for r in rows], dtype=torch.long)


class PairCollator:
    """Pairs -> TRL DPOTrainer's batch: the chosen rows, then the rejected ones; completion_mask
    is the labelling function's mask."""

    def __init__(self, pad_id: int, multiple: int = 1):
        self.pad_id, self.multiple = pad_id, multiple

    def __call__(self, examples: list[dict]) -> dict:
        ids = [e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
        masks = [e["chosen_mask"] for e in examples] + [e["rejected_mask"] for e in examples]
        return {"input_ids": _pad(ids, self.pad_id, self.multiple),
                "attention_mask": _pad([[1] * len(r) for r in ids], 0, self.multiple),
                "completion_mask": _pad(masks, 0, self.multiple)}


class SidesCollator(PairCollator):
    """Pairs -> trl.experimental's CPO/ORPO batch: chosen_* and rejected_* (labels -100 where masked)."""

    def __call__(self, examples: list[dict]) -> dict:
        out = {}
        for side in ("chosen", "rejected"):
            ids = [e[f"{side}_input_ids"] for e in examples]
            labels = [[t if m else -100 for t, m in zip(e[f"{side}_input_ids"], e[f"{side}_mask"])] for e in examples]
            out[f"{side}_input_ids"] = _pad(ids, self.pad_id, self.multiple)
            out[f"{side}_attention_mask"] = _pad([[1] * len(r) for r in ids], 0, self.multiple)
            out[f"{side}_labels"] = _pad(labels, -100, self.multiple)
        return out


class KTOCollator(PairCollator):
    """Labelled rows -> TRL KTOTrainer's batch. The KL rows (KTO's reference point) pair each
    prompt with the previous row's answer in the same micro-batch, whatever order the sampler
    drew (TRL builds them over the dataset's fixed order instead, hence its sequential sampler)."""

    def __init__(self, pad_id: int, multiple: int = 1, max_length: int | None = None):
        super().__init__(pad_id, multiple)
        self.max_length = max_length

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        split = []
        for e in examples:
            first = e["mask"].index(1)  # the answer starts at its first trained token
            split.append((e["input_ids"][:first], e["input_ids"][first:], e["mask"][first:]))
        kl_ids, kl_masks = [], []
        for i, (prompt, _, _) in enumerate(split):
            _, answer, mask = split[i - 1]
            kl_ids.append((prompt + answer)[: self.max_length])
            kl_masks.append(([0] * len(prompt) + mask)[: self.max_length])
        ids, masks = [e["input_ids"] for e in examples], [e["mask"] for e in examples]
        return {"input_ids": _pad(ids, self.pad_id, self.multiple),
                "attention_mask": _pad([[1] * len(r) for r in ids], 0, self.multiple),
                "completion_mask": _pad(masks, 0, self.multiple),
                "KL_input_ids": _pad(kl_ids, self.pad_id, self.multiple),
                "KL_attention_mask": _pad([[1] * len(r) for r in kl_ids], 0, self.multiple),
                "KL_completion_mask": _pad(kl_masks, 0, self.multiple),
                "label": torch.tensor([bool(e["label"]) for e in examples])}


class _ZeroReference:
    """preference.reference_free (DPO): a reference whose log-probs are all 0."""

    def __call__(self, input_ids=None, **kw):
        import torch
        from types import SimpleNamespace

        return SimpleNamespace(log_probs=torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1,
                                                     device=input_ids.device))


# ---------------------------------------------------------------- the trainer

def _trl_class(cfg):
    if cfg.stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig
    if cfg.stage == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer, KTOConfig
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # said once in train.log instead (core.train)
    if cfg.stage == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOTrainer, CPOConfig


def stage_args(cfg, pad_id: int) -> dict:
    """The stage's own TRL config fields (preference section)."""
    p = cfg.preference
    common = {"beta": p.beta, "max_length": cfg.template.cutoff_len}
    if cfg.stage == "dpo":
        return {**common, "loss_type": p.loss_type.split("+"), "label_smoothing": p.label_smoothing}
    if cfg.stage == "kto":
        # sequential: TRL's check for its own KL rows; ours are built per micro-batch (KTOCollator),
        # and the run's shuffled sampler comes back once the trainer is built
        return {**common, "loss_type": p.loss_type, "desirable_weight": p.desirable_weight,
                "undesirable_weight": p.undesirable_weight, "train_sampling_strategy": "sequential"}
    if cfg.stage == "orpo":
        return {**common, "padding_value": pad_id}
    # cpo_alpha 0: SimPO alone (CPO's SFT term off); CPO pads with the tokenizer's pad id
    return {**common, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": p.simpo_gamma,
            "label_smoothing": p.label_smoothing}


def build_trainer(cfg, run_dir: Path, model, tokenizer, train_ds, eval_ds, callbacks, sft_args):
    """TRL's trainer for the stage under core.trainer's LeanTrainer (its per-step savings): its
    config is SFT_ARGS (the run's TrainingArguments, core.train.build_trainer) + the stage's fields."""
    import dataclasses

    from transformers.trainer_callback import PrinterCallback

    from .trainer import trainer_class

    trl_cls, config_cls = _trl_class(cfg)
    pad_id = tokenizer.pad_token_id
    multiple = cfg.template.pad_to_multiple_of if isinstance(cfg.template.pad_to_multiple_of, int) else 1
    kwargs = {f.name: getattr(sft_args, f.name) for f in dataclasses.fields(sft_args) if f.init}
    args = config_cls(**{**kwargs, **stage_args(cfg, pad_id)})
    if cfg.stage == "dpo":
        collator = PairCollator(pad_id, multiple)
    elif cfg.stage == "kto":
        collator = KTOCollator(pad_id, multiple, cfg.template.cutoff_len)
    else:
        collator = SidesCollator(pad_id, multiple)
    lean = trainer_class(cfg.training.offload_activations is True)
    extra = {"_track_num_input_tokens": _count_sides} if cfg.stage in stage_lib.EXPERIMENTAL else {}
    cls = type(f"Lean{trl_cls.__name__}", (lean, trl_cls), {"_prepare_dataset": _as_is, "tokenize_row": _row_as_is,
                                                             **extra})
    fresh = cfg.method != "full" and not cfg.model.adapter_from
    trainer = cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
                  processing_class=tokenizer, callbacks=callbacks or [])
    trainer.remove_callback(PrinterCallback)
    if fresh:
        drop_reference(trainer.model)  # a fresh adapter's copy is the base: disabling the adapter gives it
    for name, param in trainer.model.named_parameters():
        if ".ref." in name:
            param.requires_grad_(False)
    if cfg.stage == "kto":
        trainer.args.train_sampling_strategy = sft_args.train_sampling_strategy
    if cfg.stage == "dpo" and cfg.preference.reference_free:
        trainer.ref_model = _ZeroReference()
    return trainer


def _as_is(self, dataset, *args, **kwargs):
    return dataset  # already labelled by core.labels (prepare_data)


def _row_as_is(self, feature, model=None):
    return feature


def _count_sides(self, inputs):
    """Tokens seen (tokens/s in metrics.jsonl) of a chosen_*/rejected_* batch, which has no input_ids."""
    n = sum(inputs[k].sum() for k in ("chosen_attention_mask", "rejected_attention_mask") if k in inputs)
    if hasattr(n, "to"):
        self.state.num_input_tokens_seen += int(self.accelerator.gather(n.to(self.args.device)).sum().item())


def describe(cfg) -> str:
    """One train.log line: the stage, its trainer and its reference."""
    if cfg.stage in stage_lib.EXPERIMENTAL:
        ref = "no reference model"
    elif cfg.stage == "dpo" and cfg.preference.reference_free:
        ref = "reference-free"
    elif cfg.method == "full":
        ref = "reference: a second, frozen copy of the base"
    elif cfg.model.adapter_from:
        ref = f"reference: the base + the frozen parent adapter {cfg.model.adapter_from}"
    else:
        ref = "reference: the base (adapter disabled)"
    exp = " (trl.experimental: may change between TRL releases)" if cfg.stage in stage_lib.EXPERIMENTAL else ""
    p = cfg.preference
    return (f"stage {cfg.stage}: {stage_lib.TRAINERS[cfg.stage]}{exp}, loss {p.loss_type}, beta {p.beta:g}; {ref}")


def record(cfg) -> dict:
    """run.json's stage entry."""
    return {"stage": cfg.stage, "trainer": stage_lib.TRAINERS[cfg.stage], "loss_type": cfg.preference.loss_type,
            "experimental": cfg.stage in stage_lib.EXPERIMENTAL, "adapter_from": cfg.model.adapter_from,
            "preference": json.loads(cfg.preference.model_dump_json())}
