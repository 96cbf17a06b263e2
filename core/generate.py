"""The one generation path, with the run's own chat template: training's sample replies, chat
(the web app's worker, `lorastudio chat`) and the tests all come through here.

    reply(model, tokenizer, template, messages, ...)   -> str, generated in the calling thread (so
                                                          the caller's autocast and full-params
                                                          contexts apply: training samples)
    stream(model, tokenizer, template, messages, ...)  -> text chunks (TextIteratorStreamer and a
                                                          generation thread: chat)

Both stop at the template's end-of-turn token, the tokenizer's EOS and the template's stop
strings (which are never shown); `use_adapter=False` answers with the base through PEFT's
disable_adapter(). A template of None is plain completion (the prompt is the messages' text).
"""

from __future__ import annotations

import contextlib
import itertools
import threading


class GenerationError(ValueError):
    """generate() failed in the streaming thread (re-raised in the reader's)."""


def eos_ids(tokenizer, template) -> list[int]:
    """Stop at the template's end-of-turn token and the tokenizer's EOS."""
    ids = []
    for tok in (getattr(template, "eot_token", None), tokenizer.eos_token):
        if tok:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
    return ids


def build_prompt(tokenizer, template, messages: list[dict], system: str | None = None) -> str:
    msgs = ([{"role": "system", "content": system}] if system else []) + list(messages)
    if template is None:
        return "\n".join(m["content"] for m in msgs)
    from . import turns

    msgs, _notes = turns.prepare(template, msgs, tokenizer)  # a system prompt goes where training put it
    return template.render(msgs, add_generation_prompt=True, tokenizer=tokenizer)


def _inputs_and_settings(model, tokenizer, template, messages, system, temperature, top_p, top_k, max_new_tokens,
                         repetition_penalty, greedy) -> tuple[dict, dict, list[str]]:
    prompt = build_prompt(tokenizer, template, messages, system)
    # a rendered template carries its own BOS; plain completion lets the tokenizer add one
    enc = tokenizer(prompt, add_special_tokens=template is None, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    stops = list(getattr(template, "stop_strings", None) or [])
    settings = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_ids(tokenizer, template),
                    pad_token_id=tokenizer.pad_token_id, repetition_penalty=repetition_penalty, use_cache=True)
    if greedy or temperature <= 0:
        settings.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        settings.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    if stops:
        settings.update(stop_strings=stops, tokenizer=tokenizer)
    return enc, settings, stops


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def until_stops(texts, stops: list[str]):
    """The new part of each of TEXTS (the reply so far, growing), cut at the first stop string; the
    last len(stop) - 1 characters are held back while a stop string may still be arriving, and a
    text ending in half a multi-byte character waits for the rest. Used by transformers' and
    llama.cpp's streams alike."""
    hold = max((len(s) for s in stops), default=1) - 1
    text, sent = "", 0
    for text in texts:
        cut = _first_stop(text, stops)
        if cut is not None:
            text = text[:cut]
            break
        if text.endswith("\ufffd"):
            continue
        if len(text) - hold > sent:
            yield text[sent:len(text) - hold]
            sent = len(text) - hold
    cut = _first_stop(text, stops)
    text = text[:cut] if cut is not None else text
    if len(text) > sent:
        yield text[sent:]


@contextlib.contextmanager
def _generating(model, use_adapter: bool):
    """eval mode and no gradients for the call (a training model goes back to train mode), the base
    alone when use_adapter is False."""
    import torch

    was_training = model.training
    model.eval()
    no_adapter = not use_adapter and hasattr(model, "disable_adapter")
    try:
        with torch.no_grad(), (model.disable_adapter() if no_adapter else contextlib.nullcontext()):
            yield
    finally:
        if was_training:
            model.train()


def reply(model, tokenizer, template, messages: list[dict], system: str | None = None, temperature: float = 0.7,
          top_p: float = 0.9, top_k: int = 50, max_new_tokens: int = 256, repetition_penalty: float = 1.0,
          greedy: bool = False, use_adapter: bool = True) -> str:
    """The whole reply, generated in this thread."""
    if getattr(model, "is_gguf", False):  # llama.cpp (core.gguf_chat): the same prompt, stops and settings
        return model.reply(tokenizer, template, messages, system=system, temperature=temperature, top_p=top_p,
                           top_k=top_k, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                           greedy=greedy)
    enc, settings, stops = _inputs_and_settings(model, tokenizer, template, messages, system, temperature, top_p,
                                                top_k, max_new_tokens, repetition_penalty, greedy)
    with _generating(model, use_adapter):
        out = model.generate(**enc, **settings)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    cut = _first_stop(text, stops)
    return (text[:cut] if cut is not None else text).strip()


def stream(model, tokenizer, template, messages: list[dict], system: str | None = None, temperature: float = 0.7,
           top_p: float = 0.9, top_k: int = 50, max_new_tokens: int = 256, repetition_penalty: float = 1.0,
           greedy: bool = False, use_adapter: bool = True):
    """Yield the reply as text chunks while it is generated."""
    if getattr(model, "is_gguf", False):
        yield from model.stream(tokenizer, template, messages, system=system, temperature=temperature, top_p=top_p,
                                top_k=top_k, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                                greedy=greedy)
        return
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    enc, settings, stops = _inputs_and_settings(model, tokenizer, template, messages, system, temperature, top_p,
                                                top_k, max_new_tokens, repetition_penalty, greedy)
    cancel = threading.Event()

    class Cancelled(StoppingCriteria):  # the reader went away: stop generating
        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    errors: list[BaseException] = []

    def run():
        try:
            with _generating(model, use_adapter):
                model.generate(**enc, **settings, streamer=streamer, stopping_criteria=StoppingCriteriaList([Cancelled()]))
        except BaseException as e:  # noqa: BLE001 - re-raised in the reader's thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield from until_stops(itertools.accumulate(streamer), stops)
    finally:
        cancel.set()
        thread.join()
    if errors:
        raise GenerationError(f"generation failed: {type(errors[0]).__name__}: {errors[0]}")
