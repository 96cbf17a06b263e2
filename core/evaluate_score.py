"""Scores of one model (a run's adapter, a checkpoint, or the base) on a list of examples.

    loss, perplexity  the mean negative log-likelihood of the trained tokens only, as training
                      counts them: core.labels.encode_rows (the one labelling function) with the
                      run's template and template options, token-weighted over all rows
    exact_match       share of chat rows whose greedy answer to the last assistant turn equals the
                      reference, whitespace-stripped (core.generate.reply: the run's template, its
                      end-of-turn token and stop strings)
    chrf              sacrebleu's corpus chrF (0-100) of those answers against the references: a
                      character n-gram F-score, meaningful in any language and script

Text rows (continued pretraining) have a loss only.
"""

from __future__ import annotations

import math

CHRF_MISSING = "the similarity score needs sacrebleu: pip install 'lorastudio[eval]' (or pip install sacrebleu)"


def split_last_answer(example: dict) -> tuple[list[dict], str] | None:
    """(the conversation before its last assistant turn, that turn's text), or None (a text row,
    or no assistant turn with text)."""
    messages = example.get("messages")
    if not messages:
        return None
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None or not isinstance(messages[last].get("content"), str) or last == 0:
        return None
    return messages[:last], messages[last]["content"]


def _nll(model, enc) -> tuple[float, int]:
    """Summed negative log-likelihood of the trained tokens of one encoded row, and their count
    (the causal shift: the logits at t predict token t+1, as the Trainer's loss)."""
    import torch

    from .labels import labels_from

    device = next(model.parameters()).device
    ids = torch.tensor([enc.input_ids], device=device)
    labels = torch.tensor(labels_from(enc)[1:], device=device)
    n = int((labels != -100).sum())
    if n == 0:
        return 0.0, 0
    logits = model(input_ids=ids).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")), n


def score(model, tokenizer, template, examples: list[dict], *, cutoff_len: int, use_adapter: bool = True,
          max_new_tokens: int = 256, progress=None) -> dict:
    """Scores and per-row answers; PROGRESS(done, total) after each row."""
    import sacrebleu

    from . import generate, labels
    from .render import TemplateError

    total_nll, total_tokens = 0.0, 0
    answers, refused = [], 0
    for i, ex in enumerate(examples):
        row: dict = {"row": i + 1}
        try:
            encs = labels.encode_rows(tokenizer, template, ex, max_length=cutoff_len)
        except TemplateError as e:
            refused += 1
            row["error"] = str(e)
            encs = []
        nll, n = 0.0, 0
        with generate._generating(model, use_adapter):  # eval mode, no grad, the base alone for use_adapter=False
            for enc in encs:
                a, b = _nll(model, enc)
                nll, n = nll + a, n + b
        total_nll, total_tokens = total_nll + nll, total_tokens + n
        row.update(loss=nll / n if n else None, tokens=n)
        turn = split_last_answer(ex) if template is not None else None
        if turn is not None and "error" not in row:
            history, reference = turn
            answer = generate.reply(model, tokenizer, template, history, greedy=True, use_adapter=use_adapter,
                                    max_new_tokens=max_new_tokens)
            users = [m["content"] for m in history if m.get("role") == "user" and isinstance(m.get("content"), str)]
            row.update(prompt=users[-1] if users else "", reference=reference, answer=answer,
                       exact=answer.strip() == reference.strip(),
                       chrf=round(sacrebleu.sentence_chrf(answer, [reference]).score, 2))
        answers.append(row)
        if progress:
            progress(i + 1, len(examples))
    generated = [r for r in answers if "answer" in r]
    loss = total_nll / total_tokens if total_tokens else None
    return {
        "rows": len(examples), "refused_rows": refused, "tokens": total_tokens,
        "loss": loss, "perplexity": math.exp(min(loss, 700)) if loss is not None else None,
        "generated_rows": len(generated),
        "exact_match": sum(r["exact"] for r in generated) / len(generated) if generated else None,
        "chrf": round(sacrebleu.corpus_chrf([r["answer"] for r in generated],
                                            [[r["reference"] for r in generated]]).score, 2) if generated else None,
        "max_new_tokens": max_new_tokens, "answers": answers}
