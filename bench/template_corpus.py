"""Run a corpus of real chat templates through `lorastudio preview --json`, as an outside check
would, and score it with tests/template_oracle.py (apply_chat_template's text, prefix-diff spans).

    .venv/bin/python bench/template_corpus.py /work/heldout_templates   # a folder: index.json + <slug>.jinja

Each template becomes a tokenizer folder (the embedded tokenizer with the entry's bos/eos and the
template as its own) and one data file holding every conversation shape it takes, one row each;
one preview call per template. Prints one line per case that is not exact and the tally."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from template_oracle import SHAPES, check_rows, corpus, shapes_for, tokenizer_for  # noqa: E402


def main(folder: str) -> int:
    from lorastudio.core import model as model_lib

    base = model_lib.load_tokenizer("builtin:tiny")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for slug, entry in corpus(Path(folder)).items():
            tok = tokenizer_for(base, entry)
            tok_dir = Path(tmp) / slug
            tok.save_pretrained(tok_dir)
            shapes = shapes_for(entry)
            data = Path(tmp) / f"{slug}.jsonl"
            data.write_text("".join(json.dumps({"messages": SHAPES[s][0], **({"tools": SHAPES[s][1]} if SHAPES[s][1]
                                                                              else {})}) + "\n" for s in shapes))
            out = subprocess.run([sys.executable, "-m", "lorastudio.cli", "preview", "--model", str(tok_dir),
                                  "--data", str(data), "-n", "100", "--json"], capture_output=True, text=True,
                                 timeout=300)
            if out.returncode != 0:
                lines = out.stderr.strip().splitlines()
                ok = out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
                for s in shapes:
                    results[slug, s] = f"refused: {lines[-1] if lines else ''}" if ok else f"CRASH: {out.stderr[-300:]}"
                continue
            items = json.loads(out.stdout)
            refusals = [ln for ln in out.stderr.splitlines() if ln.startswith("template refused")]
            for row, s in enumerate(shapes, start=1):
                mine = [i for i in items if i["row"] == row]
                if not mine:
                    why = next((r for r in refusals if f"line {row}:" in r), "no sample and no refusal")
                    results[slug, s] = f"refused: {why}"
                    continue
                results[slug, s] = check_rows(tok, entry, s, mine)
    wrong = {k: v for k, v in results.items() if v is not None}
    for (slug, s), why in sorted(wrong.items()):
        print(f"{slug} / {s}: {why}")
    exact = len(results) - len(wrong)
    crashes = sum(v.startswith("CRASH") or not v.startswith("refused") for v in wrong.values())
    print(f"{exact}/{len(results)} exact ({100 * exact / max(1, len(results)):.1f}%), {len(wrong) - crashes} refused "
          f"with a reason, {crashes} wrong or crashed; {len({k for k, _ in results})} templates")
    return 0 if exact >= 0.95 * len(results) and not crashes else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "tests" / "fixtures" / "chat_templates")))
