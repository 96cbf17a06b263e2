"""Generation with the run's own chat template (used by training samples and chat)."""

from __future__ import annotations


def eos_ids(tokenizer, template) -> list[int]:
    """Stop at the template's end-of-turn token and the tokenizer's EOS."""
    ids = []
    for tok in (getattr(template, "eot_token", None), tokenizer.eos_token):
        if tok:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
    return ids


def generate_reply(model, tokenizer, template, messages: list[dict], max_new_tokens: int = 64,
                   do_sample: bool = False, **gen_kwargs) -> str:
    import torch

    prompt = template.render(messages, add_generation_prompt=True, tokenizer=tokenizer)
    enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    was_training = model.training
    model.eval()
    stop_strings = list(getattr(template, "stop_strings", None) or [])
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos_ids(tokenizer, template),
                  pad_token_id=tokenizer.pad_token_id, use_cache=True, **gen_kwargs)
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    if not do_sample:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    try:
        with torch.no_grad():
            out = model.generate(**enc, **kwargs)
    finally:
        if was_training:
            model.train()
    new = out[0, enc["input_ids"].shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    for s in stop_strings:
        text = text.split(s)[0]
    return text.strip()
