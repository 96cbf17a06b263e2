"""The rows an evaluation scores: the examples a run held out (RUN_DIR/eval_rows.jsonl, written by
training) or a file of the user's in any format core.data reads.

eval_rows.jsonl holds one normalised example a line ({"messages": [...]} with its "tools" where it
has them, or {"text": ...}): OpenAI-style rows, which core.data reads back as they were. An example
is held out only when every training row it makes is in the eval split (a conversation a template
trains one answer at a time could otherwise have some answers trained on)."""

from __future__ import annotations

import json
import os
from pathlib import Path

EVAL_ROWS = "eval_rows.jsonl"


def held_out(dataset, sources: list[int], split) -> list[dict]:
    """The examples of DATASET (core.data.load_mixture's) whose rows are all in split["test"]:
    SOURCES is each tokenized row's example (core.dataset.TokenStats.sources), split the
    train_test_split of those rows with a "source" column."""
    from .dataset import example_of

    test, train = set(split["test"]["source"]), set(split["train"]["source"])
    return [example_of(dataset[i]) for i in sorted(test - train)]


def write_rows(run_dir: str | Path, examples: list[dict]) -> Path:
    path = Path(run_dir) / EVAL_ROWS
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


class EvalDataError(ValueError):
    """No rows to evaluate on, or a file that holds none."""


def data_file(run_dir: str | Path, data: str | None) -> Path:
    """The file an evaluation reads: --data, else the rows the run held out."""
    if data:
        path = Path(data).expanduser().resolve()
        if not path.is_file():
            raise EvalDataError(f"--data {data}: file not found")
        return path
    path = Path(run_dir) / EVAL_ROWS
    if not path.is_file():
        raise EvalDataError(f"{Path(run_dir).name} holds no held-out rows ({EVAL_ROWS}: the run trained with "
                            "data.eval_split 0, or before training wrote them): give a file with --data")
    return path


def load_rows(path: str | Path) -> tuple[list[dict], str]:
    """(normalised examples, a summary line of what was skipped) of any supported file."""
    from . import data as data_lib

    try:
        examples, report = data_lib.load_file(path)
    except data_lib.DataError as e:
        raise EvalDataError(str(e)) from None
    return examples, report.summary()
