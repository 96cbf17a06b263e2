"""69 real chat templates (tests/fixtures/chat_templates, provenance and licence in its index.json)
installed as a tokenizer's own template, "auto", on every conversation shape each takes: the
training text must be apply_chat_template's, the trained spans every answer + its end-of-turn
(tests/template_oracle.py works both out without core). At least 95% of the cases exact; the rest
refused with a TemplateError naming the reason, nothing else raised."""

from pathlib import Path

import pytest

from lorastudio.core import labels, templates
from lorastudio.core import model as model_lib
from lorastudio.core.render import TemplateError

from template_oracle import SHAPES, check_rows, corpus, freeze_dates, shapes_for, tokenizer_for

CORPUS = Path(__file__).parent / "fixtures" / "chat_templates"


def project_rows(tok, shape):
    """What training makes of SHAPE under the tokenizer's own template: the encoded rows."""
    tok, template, _added, _ids = templates.with_template(tok, "auto", copy=True)
    messages, tools = SHAPES[shape]
    found = labels.encode_rows(tok, template, {"messages": messages, **({"tools": tools} if tools else {})})
    assert all(e.n_trained > 0 for e in found)
    return tok, [{"text": e.text, "trained_spans": labels.trained_spans_chars(e)} for e in found]


def run_corpus(folder: Path) -> dict:
    base = model_lib.load_tokenizer("builtin:tiny")
    results = {}
    for slug, entry in corpus(folder).items():
        tok = tokenizer_for(base, entry)
        for shape in shapes_for(entry):
            try:
                grown, found = project_rows(tok, shape)
                results[slug, shape] = check_rows(grown, entry, shape, found)
            except TemplateError as e:
                results[slug, shape] = f"refused: {e}"
    return results


def test_real_templates_render_and_train_exactly(monkeypatch):
    freeze_dates(monkeypatch)
    results = run_corpus(CORPUS)
    assert len({slug for slug, _ in results}) >= 60
    wrong = {k: v for k, v in results.items() if v is not None}
    exact = len(results) - len(wrong)
    print(f"{exact}/{len(results)} exact; the rest:")
    for (slug, shape), why in sorted(wrong.items()):
        print(f"  {slug} / {shape}: {why}")
    # a case that is not exact must be a refusal that names its reason, never a wrong label
    assert all(why.startswith("refused: ") for why in wrong.values()), wrong
    assert exact >= 0.95 * len(results), f"{exact}/{len(results)} exact"


# the named templates against the family's real template (from the corpus), on every shape both render
FAMILY_OF = {"llama3": "llama-3-8b-instruct", "llama3.1": "llama-3.1-8b-instruct", "llama3.2": "llama-3.2-3b-instruct",
             "mistral-v0.1": "mistral-7b-instruct-v0.1", "qwen": "qwen2.5-0.5b-instruct",
             "internlm2": "internlm2.5-1.8b-chat", "gemma": "gemma-2-2b-it"}
# (mistral v0.3, phi3, smollm, llama2 and zephyr are checked against ../shared's real tokenizers in
# test_templates.py)


@pytest.mark.parametrize("name", sorted(FAMILY_OF))
def test_named_templates_render_like_the_family(monkeypatch, name):
    freeze_dates(monkeypatch)
    entry = corpus(CORPUS)[FAMILY_OF[name]]
    tok = tokenizer_for(model_lib.load_tokenizer("builtin:tiny"), entry)
    named = templates.resolve_template(tok, name)
    compared = 0
    for shape, (messages, tools) in SHAPES.items():
        if tools:
            continue  # named templates leave tools out: tool data uses auto (a warning says so)
        for prompt in (False, True):
            convo = messages[:-1] if prompt else messages
            try:
                real = tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=prompt)
            except Exception:  # noqa: BLE001 - the family refuses this shape (e.g. a system turn)
                continue
            assert named.render(convo, prompt, tok) == real, (shape, prompt)
            compared += 1
    assert compared >= 4
