"""THE one labelling function: `encode_example` turns a normalised example into input_ids and the
mask of trained tokens (labels = input_ids where the mask is 1, else -100). Training, the dataset
preview, the CLI preview and the web app's token view all call it (or `encode_examples`, its
batched form, byte-identical). A token is trained iff its character range overlaps a trained span
of the render (core.render)."""

from __future__ import annotations

import contextlib
import gc
import itertools
import threading
from dataclasses import dataclass, field

import numpy as np

from . import turns
from .render import ChatTemplate, TemplateError

@dataclass
class Encoded:
    input_ids: list[int]
    mask: list[int]  # 1 = trained (label = id), 0 = masked (label = -100)
    text: str  # rendered text (before truncation)
    spans: list[tuple[int, int]]  # trained character spans in text (clipped at truncation)
    truncated: bool
    n_trained: int
    notes: list[str] = field(default_factory=list)  # what core.turns did (system folded, split by answer...)
    source: int = field(default=0, compare=False)  # in encode_examples: the index of the example this row came from


def _no_trained_tokens(template: ChatTemplate) -> TemplateError:
    return TemplateError(
        f"template {template.name!r} marks no assistant tokens for training "
        "(it drops or never renders the assistant answers)"
    )


def _finish(ids, mask, text, spans, max_length, kept_end) -> Encoded:
    """Truncation (keep the head: the prompt and the start of the answer) and the Encoded.
    kept_end(n): end character of the first n tokens, or None for text rows (spans kept)."""
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
        if kept_end is not None:
            end = kept_end(max_length)
            spans = [(s, min(e, end)) for s, e in spans if s < end]
    return Encoded(ids, mask, text, spans, truncated, sum(mask))


def _eos_appended(tokenizer, ids) -> list[int]:
    ids = list(ids)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)  # teach the model to end a document
    return ids


def _tokenize_row(tokenizer, template, text, spans, max_length, notes) -> Encoded:
    # The template already wrote BOS where it wants one, as apply_chat_template(tokenize=True).
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:  # slow (pure Python) tokenizers have no offsets
        raise TemplateError(f"tokenizer {type(tokenizer).__name__} can't map tokens to characters: {e}") from e
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    mask = [int(any(s < se and e > ss for ss, se in spans)) for s, e in offsets]
    if not any(mask):
        raise _no_trained_tokens(template)
    out = _finish(ids, mask, text, spans, max_length, lambda n: max((e for _, e in offsets[:n]), default=0))
    out.notes = notes
    return out


def encode_rows(tokenizer, template: ChatTemplate | None, example: dict, max_length: int | None = None) -> list[Encoded]:
    """THE labelling function: a normalised example -> the rows it trains as (input_ids + trained-
    token mask each): one row, or one per answer where the template needs that (core.turns).
    (`encode_examples` is the batched twin: same results, one tokenizer call for many rows.)"""
    if "messages" in example:
        if template is None:
            raise TemplateError("a chat example needs a chat template")
        return [_tokenize_row(tokenizer, template, r.text, r.spans, max_length, r.notes)
                for r in turns.rows(template, example, tokenizer)]
    elif "text" in example:
        text = example["text"]
        ids = _eos_appended(tokenizer, tokenizer(text, add_special_tokens=True)["input_ids"])
        return [_finish(ids, [1] * len(ids), text, [(0, len(text))] if text else [], max_length, None)]
    else:
        raise TemplateError("example has neither 'messages' nor 'text'")


def encode_example(tokenizer, template: ChatTemplate | None, example: dict, max_length: int | None = None) -> Encoded:
    """encode_rows for an example that trains as one row (raises where it is split by answer)."""
    found = encode_rows(tokenizer, template, example, max_length)
    if len(found) != 1:
        raise TemplateError(f"template {template.name!r} trains this conversation as {len(found)} rows, one per answer")
    return found[0]


def _masks_from_offsets(offsets: list, spans: list) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised `int(any(s < se and e > ss for ss, se in row_spans))` for every token of every row.
    -> (flat 0/1 mask over all tokens, row start indices into it, with the total appended).

    Where a row's token starts and ends are non-decreasing (what fast tokenizers give), the tokens
    a span (ss, se) trains are exactly the run [first with end > ss, first with start >= se): found by
    one searchsorted over keys row * BIG + offset (sorted across rows) and marked with a difference
    array. Other rows are computed by the plain formula."""
    lengths = np.fromiter((len(o) for o in offsets), dtype=np.int64, count=len(offsets))
    bounds = np.zeros(len(offsets) + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    total = int(bounds[-1])
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(offsets)), dtype=np.int64,
                       count=2 * total).reshape(total, 2)
    starts, ends = flat[:, 0].copy(), flat[:, 1].copy()
    row_of = np.repeat(np.arange(len(offsets), dtype=np.int64), lengths)
    # a row is "monotonic" when no token starts or ends before the previous one of the same row
    first = np.zeros(total, dtype=bool)
    first[bounds[:-1][lengths > 0]] = True
    bad_tok = ~first[1:] & ((np.diff(starts) < 0) | (np.diff(ends) < 0))
    bad_rows = np.unique(row_of[1:][bad_tok])
    if bad_rows.size:  # neutralise them, so the keys stay sorted; their masks are done below
        bad = np.isin(row_of, bad_rows)
        starts[bad] = 0
        ends[bad] = 0
    big = int(max(ends.max(initial=0), max((e for row in spans for _, e in row), default=0))) + 1
    span_row = np.fromiter((r for r, row in enumerate(spans) for _ in row), dtype=np.int64)
    span_arr = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(spans)), dtype=np.int64,
                           count=2 * span_row.size).reshape(-1, 2)
    lo = np.searchsorted(row_of * big + ends, span_row * big + span_arr[:, 0], side="right")
    hi = np.searchsorted(row_of * big + starts, span_row * big + span_arr[:, 1], side="left")
    ok = lo < hi
    delta = np.bincount(lo[ok], minlength=total + 1) - np.bincount(hi[ok], minlength=total + 1)
    mask = (np.cumsum(delta)[:total] > 0).astype(np.int8)
    for r in bad_rows.tolist():
        row_spans = spans[r]
        mask[bounds[r]: bounds[r + 1]] = [int(any(s < se and e > ss for ss, se in row_spans)) for s, e in offsets[r]]
    return mask, bounds


_gc_lock = threading.Lock()
_gc_holders = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection inside (thread-safe, nestable): building many small lists and
    tuples (token ids, offsets, parsed rows) otherwise triggers collections that walk every object
    of the process, which costs a third of a batched encode. Reference counting still frees."""
    global _gc_holders, _gc_was_enabled
    with _gc_lock:
        if _gc_holders == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_holders += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holders -= 1
            if _gc_holders == 0 and _gc_was_enabled:
                gc.enable()


def encode_examples(tokenizer, template: ChatTemplate | None, examples, max_length: int | None = None,
                    refused: list | None = None) -> list[Encoded]:
    """Every example's encode_rows, flattened in order (each Encoded's `source` is its example's
    index), batched: every chat row is split and rendered as encode_rows does, all of them are
    tokenised in ONE fast-tokenizer call (with offsets), spans become masks with numpy, and
    truncation is encode_rows'. Call it on chunks (e.g. 1000 rows). REFUSED: a list that collects
    (index, reason) of the examples the template refuses, which are left out; without it the first
    refusal is raised. Any other failure (a slow tokenizer) reruns the chunk through encode_rows."""
    examples = list(examples)
    try:
        with gc_paused():
            return _encode_batch(tokenizer, template, examples, max_length, refused)
    except Exception:  # noqa: BLE001 - the per-example path raises the first failing example's error
        pass
    out = []
    for k, x in enumerate(examples):
        try:
            found = encode_rows(tokenizer, template, x, max_length)
        except TemplateError as e:
            if refused is None:
                raise
            refused.append((k, str(e)))
            continue
        for enc in found:
            enc.source = k
        out += found
    return out


def _encode_batch(tokenizer, template, examples: list, max_length, refused=None) -> list[Encoded]:
    out: list[Encoded] = []
    if any("messages" in x for x in examples) and template is None:
        raise TemplateError("a chat example needs a chat template")
    texts_of: list = []  # per example: [("text", ids)] for text rows, or its Rows
    chat_rows, errors = [], []
    for k, x in enumerate(examples):
        if "messages" in x:
            try:
                found = turns.rows(template, x, tokenizer)
            except TemplateError as e:
                if refused is None:
                    raise
                errors.append((k, str(e)))
                found = []
            texts_of.append(found)
            chat_rows += found
        elif "text" in x:
            texts_of.append(None)
        else:
            raise TemplateError("example has neither 'messages' nor 'text'")
    plain = [k for k, x in enumerate(examples) if "messages" not in x]
    plain_ids = dict(zip(plain, tokenizer([examples[k]["text"] for k in plain], add_special_tokens=True)["input_ids"])) \
        if plain else {}
    encoded_chat = []
    if chat_rows:
        enc = tokenizer([r.text for r in chat_rows], add_special_tokens=False, return_offsets_mapping=True,
                        return_attention_mask=False, return_token_type_ids=False)
        ids_rows, offsets = enc["input_ids"], enc["offset_mapping"]
        mask, bounds = _masks_from_offsets(offsets, [r.spans for r in chat_rows])
        trained = np.concatenate(([0], np.cumsum(mask, dtype=np.int64)))
        if (trained[bounds[1:]] == trained[bounds[:-1]]).any():
            raise _no_trained_tokens(template)
        mask_list = mask.tolist()
        for j, r in enumerate(chat_rows):
            a, b = int(bounds[j]), int(bounds[j + 1])
            e = _finish(list(ids_rows[j]), mask_list[a:b], r.text, r.spans, max_length,
                        lambda n, o=offsets[j]: max((end for _, end in o[:n]), default=0))
            e.notes = r.notes
            encoded_chat.append(e)
    chat_iter = iter(encoded_chat)
    for k, found in enumerate(texts_of):
        if found is None:
            text = examples[k]["text"]
            ids = _eos_appended(tokenizer, plain_ids[k])
            rows_k = [_finish(ids, [1] * len(ids), text, [(0, len(text))] if text else [], max_length, None)]
        else:
            rows_k = [next(chat_iter) for _ in found]
        for e in rows_k:
            e.source = k
        out += rows_k
    if refused is not None:
        refused += errors
    return out


def labels_from(enc: Encoded) -> list[int]:
    return [i if m else -100 for i, m in zip(enc.input_ids, enc.mask)]


def trained_spans_chars(enc: Encoded) -> list[tuple[int, int]]:
    """Trained character spans of enc.text, sorted and merged (for `lorastudio preview --json`)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(enc.spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
