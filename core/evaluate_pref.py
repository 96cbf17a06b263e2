"""Reward accuracy of a preference run (stage dpo, orpo, simpo) on held-out pairs: the share of
pairs whose chosen answer gets the higher implicit reward, as the preference trainers count it.

    dpo      reward = log p_policy(answer) - log p_reference(answer), summed over the answer's
             trained tokens; the reference as training had it: the base with the adapter disabled,
             or the parent adapter (model.adapter_from); preference.reference_free: no reference
    simpo,   reward = the mean log-probability of the answer's tokens (length-normalised, no
    orpo     reference)

Both are scaled by preference.beta, as TRL logs them (eval_rewards/accuracies, eval_rewards/margins
in metrics.jsonl are the same figures on the same pairs). The pairs are the ones the
run held out, rebuilt as training built them (core.preference.prepare_data: same files, seed and
labelling), or a file of pairs (--data). KTO rows are not pairs: no reward accuracy for them.
"""

from __future__ import annotations

import contextlib

PAIRED = ("dpo", "orpo", "simpo")


class NoPairs(ValueError):
    """A preference run without held-out pairs, or a file without pairs."""


def pairs(cfg, tokenizer, template, path=None):
    """The tokenized pairs (chosen_input_ids, chosen_mask, rejected_input_ids, rejected_mask)."""
    from . import preference, preference_data

    if path is None:
        _train, held, *_ = preference.prepare_data(cfg, tokenizer, template)
        if held is None:
            raise NoPairs("this preference run held out no pairs (data.eval_split 0): give a file of pairs with --data")
        return held
    examples, _report = preference_data.load_file(path, want="preference")
    ds, _stats = preference_data.tokenize(examples, tokenizer, template, cfg.template.cutoff_len)
    if len(ds) == 0:
        raise NoPairs(f"{path}: no pair has a trained token in both answers")
    return ds


def _logp(model, ids: list[int], mask: list[int]) -> tuple[float, int]:
    """Summed log-probability of the trained tokens (mask 1) and their count."""
    import torch

    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    target = torch.tensor(ids[1:], device=device)
    keep = torch.tensor(mask[1:], device=device, dtype=torch.bool)
    logits = model(input_ids=x).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0]
    return float(lp[keep].sum()), int(keep.sum())


@contextlib.contextmanager
def _reference(model, cfg):
    """The reference model for the duration: the parent adapter, or the base alone."""
    from . import generate

    if cfg.model.adapter_from:
        active = model.active_adapter
        if "reference" not in model.peft_config:
            model.load_adapter(str(cfg.model.adapter_from), adapter_name="reference")
        model.set_adapter("reference")
        try:
            with generate._generating(model, True):
                yield
        finally:
            model.set_adapter(active)
    else:
        with generate._generating(model, False):
            yield


def reward_accuracy(model, cfg, ds, progress=None, use_adapter: bool = True) -> dict:
    """USE_ADAPTER False: the base as the policy (the run's starting point, for comparison)."""
    from . import generate

    stage = cfg.stage
    use_reference = stage == "dpo" and not cfg.preference.reference_free
    sides = ("chosen", "rejected")
    policy = []
    with generate._generating(model, use_adapter):
        for i, row in enumerate(ds):
            policy.append({s: _logp(model, row[f"{s}_input_ids"], row[f"{s}_mask"]) for s in sides})
            if progress:
                progress(i + 1, 2 * len(ds) if use_reference else len(ds))
    reference = [{s: (0.0, 1) for s in sides} for _ in policy]
    if use_reference:
        with _reference(model, cfg):
            for i, row in enumerate(ds):
                reference[i] = {s: _logp(model, row[f"{s}_input_ids"], row[f"{s}_mask"]) for s in sides}
                if progress:
                    progress(len(ds) + i + 1, 2 * len(ds))

    beta = cfg.preference.beta  # rewards on the trainers' scale (TRL's rewards/chosen, rewards/margins)

    def reward(p, r, side):
        if stage == "dpo":
            return beta * (p[side][0] - r[side][0])
        return beta * p[side][0] / max(p[side][1], 1)  # simpo, orpo: the mean log-probability

    rows = []
    for i, (p, r) in enumerate(zip(policy, reference)):
        rc, rr = reward(p, r, "chosen"), reward(p, r, "rejected")
        rows.append({"row": i + 1, "reward_chosen": round(rc, 4), "reward_rejected": round(rr, 4), "correct": rc > rr})
    n = len(rows)
    return {"pairs": n, "reward_accuracy": sum(r["correct"] for r in rows) / n if n else None,
            "reward_margin": sum(r["reward_chosen"] - r["reward_rejected"] for r in rows) / n if n else None,
            "reward": "log-ratio to the reference" if use_reference else "mean log-probability",
            "reference": ("parent adapter" if cfg.model.adapter_from else "base") if use_reference else None,
            "pair_rows": rows}
