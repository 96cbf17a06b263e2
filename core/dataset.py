"""From normalised examples to what the Trainer eats: input_ids + labels, via the one
labelling function `labels.encode_example` (the same one the preview shows), batched by
`labels.encode_examples` (same results, one tokenizer call per CHUNK rows)."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field

from . import labels

CHUNK = 1000  # rows per encode_examples call


@dataclass
class TokenStats:
    samples: int = 0  # examples in
    kept: int = 0  # rows with at least one trained token
    truncated: int = 0  # longer than cutoff_len (head kept)
    no_trained_tokens: int = 0  # dropped: nothing left to learn after truncation
    rows: int = 0  # training rows made (a conversation is split into one row per answer where its template needs it)
    refused: int = 0  # examples the template refused (e.g. a system message under template.system: refuse)
    refusals: list[str] = field(default_factory=list)  # the first few reasons
    notes: dict = field(default_factory=dict)  # what core.turns did -> how many rows
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list)
    # each kept row's example (its index in the dataset tokenized): which examples a split held out
    sources: list[int] = field(default_factory=list, compare=False, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("sources", None)
        lens = sorted(d.pop("lengths"))
        if lens:
            d["length_mean"] = round(sum(lens) / len(lens), 1)
            d["length_p90"] = lens[int(0.9 * (len(lens) - 1))]
            d["length_max"] = lens[-1]
        return d


def example_of(row: dict) -> dict:
    """A dataset row -> the normalised example (core.data stores chat examples as JSON, so tool
    arguments of any shape survive Arrow's column types)."""
    return json.loads(row["chat"]) if "chat" in row else row


def tokenize(dataset, tokenizer, template, cutoff_len: int):
    """datasets.Dataset of {messages}|{text} -> Dataset(input_ids, labels) and TokenStats."""
    from datasets import Dataset

    stats = TokenStats()
    ids_col, labels_col = [], []
    rows = map(example_of, dataset)
    offset = 0
    while chunk := list(itertools.islice(rows, CHUNK)):
        refused = []
        encoded = labels.encode_examples(tokenizer, template, chunk, max_length=cutoff_len, refused=refused)
        stats.samples += len(chunk)
        stats.refused += len(refused)
        stats.refusals += [reason for _, reason in refused][: max(0, 5 - len(stats.refusals))]
        for enc in encoded:
            stats.rows += 1
            for note in enc.notes:
                stats.notes[note] = stats.notes.get(note, 0) + 1
            stats.truncated += int(enc.truncated)
            if enc.n_trained == 0:
                stats.no_trained_tokens += 1
                continue
            stats.kept += 1
            stats.tokens += len(enc.input_ids)
            stats.trained_tokens += enc.n_trained
            stats.lengths.append(len(enc.input_ids))
            stats.sources.append(offset + enc.source)
            ids_col.append(enc.input_ids)
            labels_col.append(labels.labels_from(enc))
        offset += len(chunk)
    return Dataset.from_dict({"input_ids": ids_col, "labels": labels_col}), stats


def pack(dataset, seq_length: int):
    """Best-fit-decreasing packing (TRL): rows keep `seq_lengths`, so the collator emits
    position_ids that restart per sample and attention never crosses samples."""
    from trl import pack_dataset

    return pack_dataset(dataset, seq_length, strategy="bfd")


def collator(tokenizer, padding_free: bool, pad_to_multiple_of: int = 1):
    """padding_free (packed rows, or template.padding_free): the micro-batch becomes one row,
    position_ids restart at each sample (HF builds a block-diagonal causal mask from them) and
    the label at each sample's first token is -100, so no sample attends to or predicts across
    another. Otherwise rows are padded to the longest by position: labels are padded with -100,
    never masked by token id (pad may == eos).

    pad_to_multiple_of > 1: rows are padded up to a multiple of it (fewer distinct shapes and
    aligned ones: a GPU step on rows of varying, odd lengths runs slower than on a few aligned
    lengths, docs/BENCHMARKS.md). In a padding-free row the pad tokens continue the last sample's
    positions: they come after every real token, so causal attention keeps them out of every real
    token's view, they carry label -100, and the row's segment structure (and so its attention
    path: one sample = plain causal) is unchanged. The pad count rides along as `num_pad_tokens`
    (an int the trainer pops before the forward) so tokens/s counts real tokens only."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    if not padding_free:
        return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=False,
                                               pad_to_multiple_of=pad_to_multiple_of if pad_to_multiple_of > 1 else None)
    base = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    if pad_to_multiple_of <= 1:
        return base
    return _PaddedFlatCollator(base, tokenizer.pad_token_id, pad_to_multiple_of)


class _PaddedFlatCollator:
    """TRL's padding-free collator, then the row padded up to a multiple (see `collator`)."""

    def __init__(self, base, pad_token_id: int, multiple: int):
        self.base, self.pad_token_id, self.multiple = base, pad_token_id, multiple

    def __call__(self, examples):
        import torch

        out = self.base(examples)
        n = out["input_ids"].shape[1]
        pad = -n % self.multiple
        if pad:
            last = out["position_ids"][0, -1]
            out["input_ids"] = torch.cat([out["input_ids"], out["input_ids"].new_full((1, pad), self.pad_token_id)], 1)
            out["labels"] = torch.cat([out["labels"], out["labels"].new_full((1, pad), -100)], 1)
            out["position_ids"] = torch.cat([out["position_ids"], last + 1 + torch.arange(pad)[None]], 1)
            # varlen attention kernels read the segments from these: the last one grows by `pad`
            if "cu_seq_lens_q" in out:
                cu = out["cu_seq_lens_q"].clone()
                cu[-1] += pad
                out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu
                out["max_length_q"] = out["max_length_k"] = int(cu.diff().max())
            if "seq_idx" in out:
                out["seq_idx"] = torch.cat([out["seq_idx"], out["seq_idx"][:, -1:].expand(1, pad)], 1)
        out["num_pad_tokens"] = pad
        return out
