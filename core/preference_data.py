"""Preference data: rows of the dpo/orpo/simpo stages (a prompt with a chosen and a rejected
answer) and of the kto stage (a prompt with one answer labelled good or bad), normalised to
conversations and labelled by THE labelling function (core.labels.encode_example), which the
preview shows too.

Row shapes, detected like the SFT formats (a majority vote of the first rows):

  pairs ("preference")
    {"prompt": str | messages, "chosen": str | message | messages, "rejected": ...}   TRL
    {"chosen": messages, "rejected": messages}            TRL's implicit prompt (shared prefix)
    {"conversations": [...], "chosen": {...}, "rejected": {...}, "system"?}   LLaMA-Factory/ShareGPT
    {"messages": [...], "chosen": ..., "rejected": ...}
    {"instruction": str, "input"?: str, "chosen": str, "rejected": str}      LLaMA-Factory alpaca
  labelled answers ("kto")
    {"prompt": str | messages, "completion": str | message | messages, "label": bool}   TRL
    {"messages" | "conversations": [... ending with the answer], "label" | "kto_tag": bool}

Normalised: a pair is {"chosen": {"messages"}, "rejected": {"messages"}}, both conversations the
same up to their last (assistant) turn; a KTO row is {"messages", "label"}. A kto stage also takes
pairs (chosen -> good, rejected -> bad, as TRL unpairs them). Each side goes through the SFT
normaliser (core.data_formats) as a conversation, so roles, content parts and tool calls read
the same, and an unusable row is skipped with its file, row and field.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data_files import FIX_SEP, DataError, RowError, Skipped, read_file, tname
from .data_formats import DETECT_ROWS, normalise_row
from .data_messages import preference_kind

KINDS = ("preference", "kto")
TOP_KEYS = ("prompt", "chosen", "rejected", "completion", "label", "kto_tag", "messages", "conversations",
            "instruction", "input", "system", "tools")
LABEL_KEYS = ("label", "kto_tag")


def detect(rows: list[Any], columns: dict | None = None) -> str | None:
    """'preference' or 'kto' by a majority of the first rows (their columns mapped), None for SFT data."""
    col = (columns or {}).get
    rows = [{k: r[col(k, k)] for k in TOP_KEYS if col(k, k) in r} if isinstance(r, dict) and columns else r
            for r in rows[:DETECT_ROWS]]
    votes = collections.Counter(_kind(r) for r in rows)
    votes.pop(None, None)
    return votes.most_common(1)[0][0] if votes else None


def kind_of(path, fmt: str = "auto", columns: dict | None = None) -> str | None:
    """A file's preference kind ('preference' or 'kto'), None for SFT data (or a file that cannot
    be read: core.data then says why)."""
    if fmt in KINDS:
        return fmt
    if fmt not in ("auto", None, ""):
        return None
    try:
        rows, _skipped, _enc, _unit = read_file(Path(path), columns)
    except DataError:
        return None
    return detect([r for _, r in rows], columns)


def _kind(raw: Any) -> str | None:
    kind = preference_kind(raw)
    if kind is None and isinstance(raw, dict) and isinstance(raw.get("kto_tag"), bool):
        return "kto"
    if kind is None and isinstance(raw, dict) and isinstance(raw.get("label"), bool) and (
            isinstance(raw.get("messages"), list) or isinstance(raw.get("conversations"), list)):
        return "kto"
    return kind


def _answer(raw: dict, key: str) -> tuple[str, list | None]:
    """chosen/rejected/completion -> (the answer's text, the conversation it ends, if one is given)."""
    if key not in raw:
        raise RowError(f"missing field '{key}'", "missing field", field=key,
                       fix=f"add '{key}' (the answer), or drop the row")
    value = raw[key]
    convo = None
    if isinstance(value, list):
        if not value:
            raise RowError(f"field '{key}': empty list", "empty text", fix="give it the answer, or drop the row")
        convo, value = value[:-1], value[-1]
    if isinstance(value, dict):
        role = value.get("role", value.get("from", "assistant"))
        if str(role).strip().lower() not in ("assistant", "gpt", "bot", "model"):
            raise RowError(f"field '{key}': ends with a {role!r} turn, not the answer", "no assistant turn",
                           fix="end it with the assistant's answer, or drop the row")
        value = value.get("content", value.get("value"))
    if not isinstance(value, str):
        raise RowError(f"field '{key}': expected the answer as a string, got {tname(value)}", "wrong type",
                       fix="make it a string (or a message with a string content), or drop the row")
    if not value.strip():
        raise RowError(f"field '{key}': empty answer", "empty text", fix="give it an answer, or drop the row")
    return value, convo


def _conversation(raw: dict, answer: str, convo: list | None, where: str, columns, placeholders) -> dict:
    """The prompt of RAW (whatever shape) + ANSWER as a normalised SFT example {"messages"}."""
    def norm(row, fmt):
        try:
            ex = normalise_row(row, fmt, columns, placeholders)
        except RowError as e:
            raise RowError(f"{where}: {e.reason.split(FIX_SEP)[0]}", e.kind, fix=e.reason.split(FIX_SEP)[-1]) from None
        if "messages" not in ex or ex["messages"][-1]["role"] != "assistant":
            raise RowError(f"{where}: the prompt is no conversation", "no assistant turn",
                           fix="give a prompt (text or user/assistant turns before the answer), or drop the row")
        return ex

    prompt = raw.get("prompt")
    if isinstance(prompt, str):
        return norm({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]},
                    "openai")
    if isinstance(prompt, list):
        return norm({"messages": prompt + [{"role": "assistant", "content": answer}]}, "openai")
    if isinstance(raw.get("conversations"), list):
        turn = {"from": "gpt", "value": answer}
        return norm({**raw, "conversations": raw["conversations"] + [turn]}, "sharegpt")
    if isinstance(raw.get("messages"), list):
        return norm({**raw, "messages": raw["messages"] + [{"role": "assistant", "content": answer}]}, "openai")
    if isinstance(raw.get("instruction"), str):
        return norm({**raw, "output": answer}, "alpaca")
    if convo:  # TRL's implicit prompt: the answer's own conversation
        return norm({"messages": convo + [{"role": "assistant", "content": answer}]}, "openai")
    raise RowError("no prompt (prompt, conversations, messages or instruction)", "missing field", field="prompt",
                   fix="add the prompt the answers reply to, or drop the row")


def normalise(raw: Any, kind: str, columns: dict | None = None, placeholders: dict | None = None) -> dict:
    """One raw row -> a pair {"chosen", "rejected"} or a KTO row {"messages", "label"}; RowError otherwise."""
    if not isinstance(raw, dict):
        raise RowError(f"row is {tname(raw)}, expected an object", "not an object",
                       fix="write the row as a JSON object, or drop the row")
    col = (columns or {}).get
    raw = {k: raw[col(k, k)] for k in TOP_KEYS if col(k, k) in raw}  # the file's columns under our names
    columns = {k: v for k, v in (columns or {}).items() if k not in TOP_KEYS} or None  # the rest: turn keys
    if kind == "preference":
        chosen, c_convo = _answer(raw, "chosen")
        rejected, r_convo = _answer(raw, "rejected")
        if c_convo is not None and r_convo is not None and c_convo != r_convo and "prompt" not in raw:
            raise RowError("fields 'chosen' and 'rejected': their conversations differ before the answer",
                           "prompt mismatch", fix="give both the same turns before their answers, or drop the row")
        pair = {"chosen": _conversation(raw, chosen, c_convo, "field 'chosen'", columns, placeholders),
                "rejected": _conversation(raw, rejected, r_convo, "field 'rejected'", columns, placeholders)}
        if pair["chosen"]["messages"][-1]["content"] == pair["rejected"]["messages"][-1]["content"]:
            raise RowError("fields 'chosen' and 'rejected': the same answer", "same answer",
                           fix="give a worse answer as rejected, or drop the row")
        return pair
    label = next((raw[k] for k in LABEL_KEYS if k in raw), None)
    if not isinstance(label, bool):
        raise RowError(f"field 'label': expected true or false, got {tname(label)}", "wrong type", field="label",
                       fix="label the answer true (good) or false (bad), or drop the row")
    if "completion" in raw:
        text, convo = _answer(raw, "completion")
        ex = _conversation(raw, text, convo, "field 'completion'", columns, placeholders)
    else:  # the conversation ends with the labelled answer
        key = "messages" if isinstance(raw.get("messages"), list) else "conversations"
        try:
            ex = normalise_row(raw, "openai" if key == "messages" else "sharegpt", columns, placeholders)
        except RowError as e:
            raise e from None
        if "messages" not in ex:
            raise RowError(f"field '{key}': not a conversation", "no assistant turn",
                           fix="end it with the labelled assistant answer, or drop the row")
    return {"messages": ex["messages"], **({"tools": ex["tools"]} if ex.get("tools") else {}), "label": label}


def unpaired(pair: dict) -> list[dict]:
    """A pair as two KTO rows (TRL's unpair_preference_dataset)."""
    return [{**pair["chosen"], "label": True}, {**pair["rejected"], "label": False}]


@dataclass
class PairStats:
    """core.dataset.TokenStats' fields for a preference set (train.log, run.json, the memory plan)."""
    samples: int = 0
    kept: int = 0
    truncated: int = 0
    no_trained_tokens: int = 0
    rows: int = 0
    refused: int = 0
    refusals: list[str] = field(default_factory=list)
    notes: dict = field(default_factory=dict)
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list)  # every sequence: both answers of a pair
    desirable: int = 0  # kto: rows labelled true / false
    undesirable: int = 0

    def summary(self) -> dict:
        from .dataset import TokenStats

        d = TokenStats.summary(self)  # the same keys (and length percentiles)
        return {k: v for k, v in d.items() if k not in ("desirable", "undesirable") or v}


def load_file(path, fmt: str = "auto", columns: dict | None = None, placeholders: dict | None = None,
              want: str = "preference"):
    """A preference file -> (examples, core.data.LoadReport). WANT: "preference" (pairs) or "kto"
    (labelled rows; pairs are unpaired into two)."""
    from .data import LoadReport

    path = Path(path)
    name = path.name
    rows, skipped, enc, unit = read_file(path, columns)
    rows_total = len(rows) + len(skipped)
    if not rows_total:
        raise DataError(f"{name}: holds no rows")
    kind = fmt if fmt in KINDS else detect([r for _, r in rows], columns)
    if kind is None:
        raise DataError(f"{name}: no preference rows (a prompt with 'chosen' and 'rejected' answers, or an answer "
                        "with a true/false 'label'); SFT data trains under stage: sft")
    if want == "preference" and kind == "kto":
        raise DataError(f"{name}: rows with a true/false 'label' are KTO data: use stage: kto (dpo, orpo and simpo "
                        "need a chosen and a rejected answer per prompt)")
    out, used_rows = [], []
    for n, raw in rows:
        try:
            ex = normalise(raw, kind, columns, placeholders)
        except RowError as e:
            skipped.append(Skipped(n, f"{name}, {unit} {n}: {e.reason}", e.kind))
            continue
        for x in unpaired(ex) if want == "kto" and kind == "preference" else [ex]:
            out.append(x)
            used_rows.append(n)
    skipped.sort(key=lambda s: s.row)
    report = LoadReport(str(path), kind, enc, rows_total, len(out), skipped, len(skipped), used_rows)
    if not out:
        raise DataError(f"{name}: no usable {kind} rows ({len(skipped)} skipped: {report.reasons()}; "
                        f"first: {skipped[0].reason if skipped else 'none'})")
    return out, report


# ---------------------------------------------------------------- labels (core.labels)

SIDES = {"preference": ("chosen", "rejected"), "kto": ("completion",)}


def encode(tokenizer, template, ex: dict, cutoff: int | None) -> dict:
    """A normalised pair or KTO row -> {"chosen", "rejected"} or {"completion"}: each side's
    core.labels.Encoded, from THE labelling function (the template trains the last answer:
    core.stage sets template.train_on last). TemplateError when the template refuses a side."""
    from . import labels

    if "chosen" in ex:
        return {side: labels.encode_example(tokenizer, template, ex[side], cutoff) for side in ("chosen", "rejected")}
    return {"completion": labels.encode_example(tokenizer, template, ex, cutoff)}


def tokenize(examples: list[dict], tokenizer, template, cutoff: int):
    """Normalised examples -> (datasets.Dataset, PairStats). Pairs: chosen_input_ids, chosen_mask,
    rejected_input_ids, rejected_mask; KTO rows: input_ids, mask, label (mask 1 = trained)."""
    from datasets import Dataset

    from .render import TemplateError

    stats = PairStats()
    cols: dict[str, list] = collections.defaultdict(list)
    for ex in examples:
        stats.samples += 1
        try:
            sides = encode(tokenizer, template, ex, cutoff)
        except TemplateError as e:
            stats.refused += 1
            if len(stats.refusals) < 5:
                stats.refusals.append(str(e))
            continue
        stats.truncated += any(e.truncated for e in sides.values())
        if any(e.n_trained == 0 for e in sides.values()):
            stats.no_trained_tokens += 1
            continue
        stats.kept += 1
        for side, e in sides.items():
            stats.rows += 1
            stats.tokens += len(e.input_ids)
            stats.trained_tokens += e.n_trained
            stats.lengths.append(len(e.input_ids))
            for note in e.notes:
                stats.notes[note] = stats.notes.get(note, 0) + 1
            prefix = "" if side == "completion" else f"{side}_"
            cols[f"{prefix}input_ids"].append(e.input_ids)
            cols[f"{prefix}mask"].append(e.mask)
        if "label" in ex:
            cols["label"].append(ex["label"])
            stats.desirable += ex["label"]
            stats.undesirable += not ex["label"]
    return Dataset.from_dict(dict(cols)), stats


def samples(tokenizer, template, examples: list[dict], row_numbers: list[int], n: int, cutoff: int | None,
            unit: str = "row") -> tuple[list[dict], list[str]]:
    """The first N preference samples as the preview shows them: per side its rendered text and
    trained character spans (core.preview.samples' fields), from the same labelling as training."""
    from . import labels
    from .render import TemplateError

    out, refused = [], []
    for ex, row in zip(examples, row_numbers):
        if len(out) >= n:
            break
        try:
            sides = encode(tokenizer, template, ex, cutoff)
        except TemplateError as e:
            refused.append(f"{unit} {row}: {e}")
            continue
        item = {"row": row, **({"label": ex["label"]} if "label" in ex else {})}
        for side, e in sides.items():
            source = ex[side] if side in ex else ex
            item[side] = {"messages": source["messages"], "text": e.text,
                          "trained_spans": [list(s) for s in labels.trained_spans_chars(e)],
                          "n_tokens": len(e.input_ids), "n_trained": e.n_trained, "truncated": e.truncated}
        out.append(item)
    return out, refused
