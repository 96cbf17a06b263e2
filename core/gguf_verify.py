"""Is the GGUF the merged model? Written to OUT/verification.json by core.gguf.export.

    answers    the GGUF, loaded by llama.cpp, against the merged model (transformers) on the run's
               sample prompts, both greedy from the same prompt ids (the run's template, rendered
               and tokenized as in training): exact answers, and top-1 agreement of llama.cpp's
               next token with the merged model's answer, teacher-forced over the answer tokens
    tokens     llama.cpp's own tokenization of each rendered prompt equals the run's tokenizer's
               (what llama.cpp and Ollama feed the model when they render the template themselves):
               reported, with the answers llama.cpp gives from its own ids, and a warning when they differ
    metadata   the GGUF's chat template, BOS/EOS ids, add-BOS flag equal the run's, and every
               end-of-turn/EOS token of the run is one llama.cpp ends generation on

Criteria by type: f32/f16/bf16: every answer identical; 8- and 6-bit: top-1 >= 95%; 5 bits and
fewer: top-1 >= 90%, judged only for a model of >= 1B parameters (on a tiny model a 4-bit grid
is coarse against its weights, so the figure is reported, not judged).
"""

from __future__ import annotations

from pathlib import Path

EXACT_TYPES = ("f32", "f16", "bf16")
HIGH_BIT = ("q8_0", "q6_k")
LOW_BIT_MIN_PARAMS = 1_000_000_000


def criterion(qtype: str, n_params: int) -> dict:
    if qtype in EXACT_TYPES:
        return {"rule": "identical greedy answers", "judged": True}
    if qtype in HIGH_BIT:
        return {"rule": "top-1 agreement >= 95%", "min_top1": 0.95, "judged": True}
    judged = n_params >= LOW_BIT_MIN_PARAMS
    return {"rule": "top-1 agreement >= 90%" + ("" if judged else " (not judged: under 1B parameters)"),
            "min_top1": 0.90, "judged": judged}


def prompts_of(cfg) -> list[str]:
    """The run's sample prompts, then the merge verification's questions (no repeats)."""
    from .convert import VERIFY_PROMPTS

    out: list[str] = []
    for q in list(cfg.training.sample_prompts or []) + [q for q, _ in VERIFY_PROMPTS]:
        if q not in out:
            out.append(q)
    return out


def _field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def metadata(gguf_file: Path, gmodel, tokenizer, template) -> dict:
    import gguf

    from .generate import eos_ids

    r = gguf.GGUFReader(str(gguf_file))
    run_tpl = template.source if template is not None else None
    add_bos = bool(getattr(tokenizer, "add_bos_token", False))
    eot_ids = eos_ids(tokenizer, template)
    checks = {
        "chat_template": _field(r, "tokenizer.chat_template") == run_tpl,
        "bos_token_id": tokenizer.bos_token_id is None or _field(r, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id,
        "eos_token_id": _field(r, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id,
        "add_bos_token": bool(_field(r, "tokenizer.ggml.add_bos_token")) == add_bos,
        "end_of_turn_is_eog": all(t in gmodel.eog for t in eot_ids),
    }
    return {"passed": all(checks.values()), "checks": checks,
            "gguf": {"bos_token_id": _field(r, "tokenizer.ggml.bos_token_id"),
                     "eos_token_id": _field(r, "tokenizer.ggml.eos_token_id"),
                     "add_bos_token": _field(r, "tokenizer.ggml.add_bos_token"), "eog_ids": sorted(gmodel.eog)},
            "run": {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "add_bos_token": add_bos,
                    "end_of_turn": [tokenizer.convert_ids_to_tokens(t) for t in eot_ids], "end_of_turn_ids": eot_ids}}


def verify(merged_dir: Path, gguf_file: Path, qtype: str, prompts: list[str], max_new_tokens: int = 32,
           log=print) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from . import convert, gguf_chat
    from .generate import build_prompt, eos_ids

    tokenizer, template, _ = convert.folder_tokenizer(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype="auto").eval()
    n_params = sum(p.numel() for p in model.parameters())
    stops = eos_ids(tokenizer, template)
    log(f"verifying {gguf_file.name} with llama.cpp against the merged model on {len(prompts)} prompts")
    gmodel = gguf_chat.GGUFModel(gguf_file, n_ctx=512, logits_all=True)  # scores: n_ctx x vocab floats
    rows, agree, total, same_tokens = [], 0, 0, 0
    for q in prompts:
        prompt = build_prompt(tokenizer, template, [{"role": "user", "content": q}])
        ids = tokenizer(prompt, add_special_tokens=template is None)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id)
        want = out[0, len(ids):].tolist()
        got = gmodel.greedy_ids(ids, max_new_tokens, stops)
        # teacher-forced: llama.cpp's next token at every position of the merged model's answer
        logits = gmodel.logits(ids + want[:-1]) if want else np.zeros((0, 1))
        top1 = logits[len(ids) - 1:].argmax(-1).tolist() if want else []
        agree += sum(int(a == b) for a, b in zip(top1, want))
        total += len(want)
        own = gmodel.tokenize(prompt)  # what llama.cpp / Ollama feed the model from the same text
        same_tokens += int(own == ids)
        native = got if own == ids else gmodel.greedy_ids(own, max_new_tokens, stops)
        rows.append({"prompt": q, "merged": tokenizer.decode(want, skip_special_tokens=True).strip(),
                     "gguf": tokenizer.decode(got, skip_special_tokens=True).strip(), "identical": got == want,
                     "own_tokenization_identical": native == want})
    meta = metadata(gguf_file, gmodel, tokenizer, template)
    gmodel.close()
    del model
    crit = criterion(qtype, n_params)
    top1 = agree / total if total else 1.0
    identical = sum(r["identical"] for r in rows)
    if qtype in EXACT_TYPES:
        answers_ok = identical == len(rows)
    else:
        answers_ok = top1 >= crit["min_top1"] or not crit["judged"]
    tokens_ok = same_tokens == len(prompts)
    warnings = [] if tokens_ok else [
        f"llama.cpp's own tokenizer splits {len(prompts) - same_tokens} of {len(prompts)} rendered prompts differently "
        "from the run's tokenizer: LoRA Studio's GGUF chat feeds the run's token ids; llama.cpp and Ollama rendering "
        f"the template themselves got {sum(r['own_tokenization_identical'] for r in rows)}/{len(rows)} answers identical"]
    v = {"passed": bool(answers_ok and meta["passed"]), "criterion": crit["rule"], "type": qtype, "warnings": warnings,
         "parameters": n_params,
         "answers": {"prompts": len(rows), "identical": identical, "top1_agreement": top1, "positions": total,
                     "judged": crit["judged"], "passed": bool(answers_ok), "rows": rows},
         "tokenization": {"prompts": len(prompts), "same_ids": same_tokens, "passed": tokens_ok},
         "metadata": meta}
    log(f"verification: {identical}/{len(rows)} answers identical, top-1 agreement {top1:.2%} over {total} tokens, "
        f"tokenization {same_tokens}/{len(prompts)}, metadata {'ok' if meta['passed'] else meta['checks']}")
    return v
