"""Dataset shapes users bring beyond plain chat: tool calls (glaive/LLaMA-Factory ShareGPT with
`function_call`/`observation` + `tools`, OpenAI `tool_calls`/`role: tool` + `tools`), content parts
(`text` under `text` or `value`), media refused by name, reasoning, and preference rows sent to
the preference stage. Then `lorastudio preview --json` on them: the interface an outside check
calls (row, messages, tools, text, trained_spans; exit 2 and one error line when refused)."""

import json
import subprocess
import sys

import pytest

from lorastudio.core.data import DataError, load_file
from lorastudio.core.data_formats import RowError, normalise_row

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
GLAIVE = {"conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
    {"from": "observation", "value": json.dumps({"temp": 21})},
    {"from": "gpt", "value": "It is 21 degrees in Paris."}], "tools": json.dumps([WEATHER])}
OPENAI_TOOLS = {"messages": [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": -3}"},
    {"role": "assistant", "content": "It is -3 degrees in Oslo."}], "tools": [{"type": "function", "function": WEATHER}]}


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_glaive_sharegpt_tool_calls():
    ex = normalise_row(GLAIVE, "sharegpt")
    call, result = ex["messages"][1], ex["messages"][2]
    assert call == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert result == {"role": "tool", "content": "{\"temp\": 21}"}
    assert ex["tools"] == [{"type": "function", "function": WEATHER}]


def test_openai_tool_calls_arguments_become_objects():
    ex = normalise_row(OPENAI_TOOLS, "openai")
    assert ex["messages"][1]["tool_calls"][0] == {
        "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}, "id": "call_1"}
    assert ex["messages"][2] == {"role": "tool", "content": "{\"temp\": -3}", "tool_call_id": "call_1"}
    assert ex["tools"][0]["function"]["name"] == "get_weather"


def test_tool_rows_errors_name_the_field():
    bad = json.loads(json.dumps(GLAIVE))
    bad["conversations"][1]["value"] = "{not json"
    with pytest.raises(RowError, match=r"'conversations'\[1\]\.value: not valid JSON"):
        normalise_row(bad, "sharegpt")
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"},
                        {"role": "assistant", "content": "ok"}]}
    with pytest.raises(RowError, match=r"'messages'\[1\]\.content: a tool result without a tool call"):
        normalise_row(bad, "openai")


def test_content_parts_text_and_value_and_media_refused():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "value": "Hi"}, {"type": "text", "text": "there"}]},
                        {"role": "assistant", "content": [{"type": "text", "value": "Hello."}]}]}
    assert normalise_row(row, "openai")["messages"] == [{"role": "user", "content": "Hi\nthere"},
                                                        {"role": "assistant", "content": "Hello."}]
    row["messages"][0]["content"].append({"type": "image", "image": "cat.png"})
    with pytest.raises(RowError, match=r"'messages'\[0\]\.content\[2\]: image content; this studio trains text-only"):
        normalise_row(row, "openai")


def test_reasoning_field_kept():
    row = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4", "reasoning_content": "Two and two."}]}
    assert normalise_row(row, "openai")["messages"][1]["reasoning_content"] == "Two and two."


@pytest.mark.parametrize("row, what", [
    ({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}, "DPO, ORPO, SimPO"),
    ({"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello"},
      "rejected": {"from": "gpt", "value": "No"}}, "DPO, ORPO, SimPO"),
    ({"prompt": "Hi", "completion": "Hello!", "label": True}, "KTO"),
])
def test_preference_rows_point_to_the_preference_stage(tmp_path, row, what):
    with pytest.raises(DataError, match=f"preference data.*{what}|{what} preference data"):
        load_file(jsonl(tmp_path / "pref.jsonl", [row] * 3))


def test_glaive_file_every_row_used(tmp_path):
    rows, report = load_file(jsonl(tmp_path / "glaive.jsonl", [GLAIVE, OPENAI_TOOLS | {}] and [GLAIVE] * 5))
    assert report.rows_used == 5 and report.rows_skipped == 0 and report.used_rows == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- lorastudio preview --json

def preview(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lorastudio.cli", "preview", *args], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.fixture
def qwen_like(tmp_path):
    """A tokenizer folder whose own template renders tools (ChatML with a tools block), as
    Qwen2.5's does; built from the embedded tokenizer, so no download."""
    from lorastudio.core import model as model_lib

    tok = model_lib.load_tokenizer("builtin:tiny")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>"})
    tok.chat_template = (
        "{%- if tools %}{{ '<|im_start|>system\\nTools: ' + (tools | map(attribute='function.name') | join(', '))"
        " + '<|im_end|>\\n' }}{%- endif %}"
        "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
        "{%- if m.tool_calls %}{%- for c in m.tool_calls %}{{ '<tool_call>' + (c.function | tojson) + '</tool_call>' }}"
        "{%- endfor %}{%- else %}{{ m.content }}{%- endif %}{{ '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
    folder = tmp_path / "qwen-like"
    tok.save_pretrained(folder)
    return folder, tok


def test_preview_json_tool_rows_train_calls_never_results(tmp_path, qwen_like):
    folder, tok = qwen_like
    for src in (OPENAI_TOOLS, GLAIVE):
        data = jsonl(tmp_path / "tools.jsonl", [src, src])
        out = preview("--model", str(folder), "--data", str(data), "-n", "2", "--json")
        assert out.returncode == 0, out.stderr
        items = json.loads(out.stdout)
        assert [i["row"] for i in items] == [1, 2]
        item = items[1]
        ex = normalise_row(src, "openai" if "messages" in src else "sharegpt")
        assert item["tools"] == ex["tools"] and item["messages"] == ex["messages"]
        assert item["text"] == tok.apply_chat_template(ex["messages"], tools=ex["tools"], tokenize=False)
        trained = "".join(item["text"][s:e] for s, e in item["trained_spans"])
        assert '<tool_call>{"name": "get_weather"' in trained and trained.count("<|im_end|>") == 2
        result = ex["messages"][2]["content"]
        start = item["text"].index(result)
        assert all(e <= start or s >= start + len(result) for s, e in item["trained_spans"])  # never the result
        assert "Tools: get_weather" not in trained


def test_preview_refusals_exit_2_with_one_error_line(tmp_path, qwen_like):
    folder, _ = qwen_like
    # a preference file with no usable pair (a preview of good ones: tests/test_preference.py)
    pref = jsonl(tmp_path / "pref.jsonl", [{"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}])
    for args in (["--data", str(pref)], ["--data", str(tmp_path / "missing.jsonl")],
                 ["--data", str(jsonl(tmp_path / "ok.jsonl", [OPENAI_TOOLS])), "--template", "custom",
                  "--custom-template", str(tmp_path / "nope.jinja")]):
        out = preview("--model", str(folder), *args, "--json")
        assert out.returncode == 2 and out.stdout == "", (args, out)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.stderr, lines
    # a template that refuses every row: exit 2 too, naming the row
    sysrow = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
                           {"role": "assistant", "content": "a"}]}
    strict = tmp_path / "no-system.jinja"
    strict.write_text("{%- for m in messages %}{%- if m.role == 'system' %}{{ raise_exception('no system role') }}"
                      "{%- endif %}{{ m.role + ': ' + m.content + '\\n' }}{%- endfor %}")
    data = jsonl(tmp_path / "sys.jsonl", [sysrow])
    out = preview("--model", str(folder), "--data", str(data), "--custom-template", str(strict), "--system", "refuse",
                  "--json")
    assert out.returncode == 2 and out.stderr.startswith("error: the template refused every row") \
        and "line 1" in out.stderr, out.stderr
    out = preview("--model", str(folder), "--data", str(data), "--custom-template", str(strict), "--json")
    (item,) = json.loads(out.stdout)
    assert item["text"] == "user: S\n\nu\nassistant: a\n" and "system message folded" in item["notes"][0]


def test_preview_n_counts_samples_of_split_rows(tmp_path, qwen_like):
    folder, _ = qwen_like
    strip = tmp_path / "strip.jinja"  # strips reasoning from earlier answers: one sample per answer
    strip.write_text("{%- for m in messages %}{%- if m.role == 'assistant' and not loop.last %}"
                     "{{ 'A: ' + m.content.split('</think>')[-1] + '<|im_end|>\\n' }}"
                     "{%- else %}{{ m.role[0] | upper + ': ' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
                     "{%- if add_generation_prompt %}{{ 'A: ' }}{%- endif %}")
    row = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>r1</think>a1"},
                        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>r2</think>a2"}]}
    data = jsonl(tmp_path / "think.jsonl", [row, row])
    out = preview("--model", str(folder), "--data", str(data), "--custom-template", str(strip), "-n", "3", "--json")
    items = json.loads(out.stdout)
    assert [i["row"] for i in items] == [1, 1, 2]
    assert [i["text"] for i in items[:2]] == ["U: q1<|im_end|>\nA: <think>r1</think>a1<|im_end|>\n",
                                              "U: q1<|im_end|>\nA: a1<|im_end|>\nU: q2<|im_end|>\nA: <think>r2</think>a2<|im_end|>\n"]
    assert ["".join(i["text"][s:e] for s, e in i["trained_spans"]) for i in items[:2]] == [
        "<think>r1</think>a1<|im_end|>", "<think>r2</think>a2<|im_end|>"]
    # the Dataset tab's preview (core.analysis.preview, run by the web app's worker) gives the same
    from lorastudio.core import analysis

    tab = analysis.preview(str(folder), {"path": str(data)}, "custom", strip.read_text(), n=3, cutoff=1024)
    assert [(i["row"], i["text"], i["trained_spans"]) for i in tab["samples"]] == \
        [(i["row"], i["text"], i["trained_spans"]) for i in items]
    assert tab["samples"][0]["notes"] == items[0]["notes"] and "one row per answer" in items[0]["notes"][0]


def test_remote_code_tokenizer_through_the_opt_in(tmp_path):
    """A tokenizer folder with its own tokenization_*.py (as InternLM2 and ChatGLM3 ship): refused
    without the opt-in, loaded and previewed with it (the folder's code really runs)."""
    from lorastudio.core import model as model_lib

    folder = tmp_path / "remote-tok"
    model_lib.load_tokenizer("builtin:tiny").save_pretrained(folder)
    (folder / "tokenization_probe.py").write_text(
        "import os, pathlib\n"
        "from transformers import PreTrainedTokenizerFast\n\n"
        "class ProbeTokenizer(PreTrainedTokenizerFast):\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        super().__init__(*args, **kwargs)\n"
        "        pathlib.Path(os.environ['PROBE_MARK']).write_text(type(self).__name__)\n")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="ProbeTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_probe.ProbeTokenizer"]})
    cfg_path.write_text(json.dumps(cfg))
    data = jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                      {"role": "assistant", "content": "Hello."}]}])
    mark = tmp_path / "mark.txt"
    env = {**__import__("os").environ, "PROBE_MARK": str(mark)}
    out = preview("--model", str(folder), "--data", str(data), "--json", env=env)
    assert out.returncode == 2 and "ships its own tokenizer or model code" in out.stderr and not mark.exists()
    out = preview("--model", str(folder), "--data", str(data), "--json", "--trust-remote-code", env=env)
    assert out.returncode == 0, out.stderr
    assert mark.read_text() == "ProbeTokenizer" and "Hello." in json.loads(out.stdout)[0]["text"]


def test_chat_prompt_folds_the_system_message_as_training_did():
    """Chat uses the training template: a system prompt with a template that has no system role
    lands in the first user turn, as it did in training, instead of failing."""
    from lorastudio.core import generate, templates
    from lorastudio.core import model as model_lib

    tok = model_lib.load_tokenizer("builtin:tiny")
    gemma = templates.resolve_template(tok, "custom", custom_jinja=(
        "{%- for m in messages %}{%- if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
        "{%- endif %}{{ '<start_of_turn>' + m.role + '\\n' + m.content + '<end_of_turn>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"))
    prompt = generate.build_prompt(tok, gemma, [{"role": "user", "content": "Hi"}], system="Be brief.")
    assert prompt == "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
