"""The embedded preference sets: the tiny sample's questions (core.tiny) with their trained
answer as chosen and another question's answer as rejected, written once per workspace.

  builtin:preference  90 pairs: each of the 30 questions with 3 different wrong answers
  builtin:kto         the same pairs unpaired: 90 answers labelled true, 90 labelled false

Both are built from core.tiny's build-4 questions (PERSONA + FACTS): the presets continue an SFT
run of that build (presets/tiny_dpo.yaml, tiny_kto.yaml). A change of the rows is a new VERSION.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from . import workspace  # (core.tiny hands its questions in: it imports this module)

VERSION = "1"
NAMES = {"builtin:preference": "pairs.jsonl", "builtin:kto": "kto.jsonl"}
WRONG_PER_QUESTION = 3


def pairs(qa: list[tuple[str, str]]) -> list[dict]:
    """(prompt, chosen, rejected) rows from core.tiny's (question, answer) list, shuffled with a fixed seed."""
    rng = random.Random(20)
    rows = []
    for i, (q, a) in enumerate(qa):
        others = [qa[j][1] for j in range(len(qa)) if j != i]
        for wrong in rng.sample(others, WRONG_PER_QUESTION):
            rows.append({"prompt": q, "chosen": a, "rejected": wrong})
    rng.shuffle(rows)
    return rows


def kto_rows(qa: list[tuple[str, str]]) -> list[dict]:
    return [r for p in pairs(qa) for r in ({"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                                         {"prompt": p["prompt"], "completion": p["rejected"], "label": False})]


def path(name: str, qa: list[tuple[str, str]]) -> Path:
    """The file of a builtin preference set (written on first use)."""
    out = workspace.cache_dir() / f"preference-v{VERSION}" / NAMES[name]
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = pairs(qa) if name == "builtin:preference" else kto_rows(qa)
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, out)  # whole or absent: a second process writes the same bytes
    return out


def resolve(name: str, qa: list[tuple[str, str]]) -> str | None:
    return str(path(name.strip(), qa)) if isinstance(name, str) and name.strip() in NAMES else None
