"""core.data on real files: the shared sample data, small files of every format, and bad input."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorastudio.core.dataset import example_of
from lorastudio.core.data import (FORMATS, DataError, RowError, dataset_hash, detect_format, load_file, load_mixture,
                                  normalise_row)
from lorastudio.core.data_files import read_rows

IDENTITY = {"name": "Lumen", "author": "LoRA Studio"}

# Every file in ../shared/assets/data: (format, rows_used, rows_skipped, kind of the rows).
SHARED_TABLE = {
    "alpaca_en_demo.json": ("alpaca", 999, 0, "messages"),
    "alpaca_zh_demo.json": ("alpaca", 1000, 0, "messages"),
    "c4_demo.jsonl": ("text", 300, 0, "text"),
    "dummy_conversation.json": ("sharegpt", 500, 0, "messages"),
    "identity.json": ("alpaca", 91, 0, "messages"),
    "openai_sft.jsonl": ("openai", 128, 0, "messages"),  # bare lists of {role, content} per line
    "pretrain_example_data.jsonl": ("openai", 3, 0, "text"),  # role "pretrain" -> text
    "toy_custom_incremental_data.json": ("xtuner", 2, 0, "text"),  # every input empty -> text
    "toy_custom_multi_turn_data.json": ("xtuner", 2, 0, "messages"),
    "toy_custom_single_turn_data.json": ("xtuner", 2, 0, "messages"),
}


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def jsonl(path, rows):
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def chat(q="Hi", a="Hello"):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


# ----------------------------------------------------------------------------- shared files

def test_shared_table_covers_every_file(shared_dir):
    assert sorted(p.name for p in (shared_dir / "data").iterdir()) == sorted(SHARED_TABLE)


@pytest.mark.parametrize("name", sorted(SHARED_TABLE))
def test_shared_file(shared_dir, name):
    fmt, used, skipped, kind = SHARED_TABLE[name]
    rows, report = load_file(shared_dir / "data" / name, placeholders=IDENTITY if name == "identity.json" else None)
    assert (report.format, report.rows_used, report.rows_skipped) == (fmt, used, skipped), report.summary()
    assert report.rows_total == used + skipped and len(rows) == used
    assert all(list(r) == [kind] for r in rows)
    if name == "identity.json":
        blob = json.dumps(rows, ensure_ascii=False)
        assert "{{name}}" not in blob and "{{author}}" not in blob and "Lumen" in blob and "LoRA Studio" in blob


# ----------------------------------------------------------------------------- the six formats

SAMPLES = {
    "openai": [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]},
               [{"role": "human", "content": "2+2?"}, {"role": "gpt", "content": "4"},
                {"role": "user", "content": "dangling"}]],
    "sharegpt": [{"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"},
                                                          {"from": "gpt", "value": "Hello"}]},
                 {"conversations": [{"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4"}]}],
    "alpaca": [{"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "Be brief.",
                "history": [["Hi", "Hello"]]},
               {"instruction": "2+2?", "input": "", "output": "4"}],
    "guanaco": [{"text": "### Human: Hi ### Assistant: Hello ### Human: 2+2? ### Assistant: 4"},
                {"text": "### Human: Bye### Assistant: Goodbye\n"}],
    "xtuner": [{"conversation": [{"system": "Be brief.", "input": "Hi", "output": "Hello"},
                                 {"input": "2+2?", "output": "4"}]},
               {"conversation": [{"input": "Bye", "output": "Goodbye"}]}],
    "text": [{"text": "Plain text one."}, {"text": "Plain text two."}],
}

EXPECTED_FIRST = {
    "openai": [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")],
    "sharegpt": [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")],
    "alpaca": [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Translate\nbonjour"),
               ("assistant", "hello")],
    "guanaco": [("user", "Hi"), ("assistant", "Hello"), ("user", "2+2?"), ("assistant", "4")],
    "xtuner": [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "2+2?"), ("assistant", "4")],
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_detected_and_normalised(tmp_path, fmt):
    path = jsonl(tmp_path / f"{fmt}.jsonl", SAMPLES[fmt])
    rows, report = load_file(path)
    assert (report.format, report.rows_used, report.rows_skipped) == (fmt, 2, 0)
    if fmt == "text":
        assert rows == SAMPLES["text"]
    else:
        assert [(m["role"], m["content"]) for m in rows[0]["messages"]] == EXPECTED_FIRST[fmt]
    # the same rows as a .json list give the same result
    rows2, report2 = load_file(write(tmp_path / f"{fmt}.json", json.dumps(SAMPLES[fmt])))
    assert rows2 == rows and report2.format == fmt


def test_openai_trailing_user_dropped(tmp_path):
    rows, _ = load_file(jsonl(tmp_path / "o.jsonl", SAMPLES["openai"]))
    assert [m["role"] for m in rows[1]["messages"]] == ["user", "assistant"]


def test_txt_paragraphs_and_lines(tmp_path):
    rows, report = load_file(write(tmp_path / "p.txt", "First para\nstill first.\n\n\nSecond para.\n"))
    assert rows == [{"text": "First para\nstill first."}, {"text": "Second para."}] and report.format == "text"
    rows, _ = load_file(write(tmp_path / "l.txt", "line one\nline two\n   \nline three"))
    assert len(rows) == 2  # a whitespace-only line counts as blank -> paragraphs
    rows, _ = load_file(write(tmp_path / "l2.txt", "line one\nline two\nline three\n"))
    assert [r["text"] for r in rows] == ["line one", "line two", "line three"]


def test_json_wrapper_object_and_jsonl_named_json(tmp_path):
    rows, report = load_file(write(tmp_path / "w.json", json.dumps({"version": 1, "data": [chat(), chat()]})))
    assert report.rows_used == 2
    rows, report = load_file(write(tmp_path / "l.json", json.dumps(chat()) + "\n" + json.dumps(chat()) + "\n"))
    assert report.rows_used == 2 and report.rows_total == 2


def test_summary_line(tmp_path):
    path = write(tmp_path / "data.jsonl", json.dumps(chat()) + "\n{oops\n" + json.dumps(chat(a=" ")) + "\n")
    _, report = load_file(path)
    assert report.summary() == "data.jsonl: openai, 1 used, 2 skipped (1 invalid JSON, 1 empty assistant turn)"


# ----------------------------------------------------------------------------- bad input

def test_invalid_jsonl_line_reported(tmp_path):
    path = write(tmp_path / "d.jsonl", json.dumps(chat()) + "\n\n" + '{"messages": [}\n' + json.dumps(chat()) + "\n")
    rows, report = load_file(path)
    assert report.rows_used == 2 and report.rows_skipped == 1 and report.rows_total == 3
    assert report.skipped[0].row == 3 and report.skipped[0].reason.startswith("d.jsonl, line 3: invalid JSON (")
    assert report.skipped[0].reason.endswith(" — correct the JSON on that line or delete the line")
    raw, skipped, enc = read_rows(path)
    assert [n for n, _ in raw] == [1, 4] and skipped[0].row == 3 and enc == "utf-8"


def test_utf16_with_bom(tmp_path):
    rows, report = load_file(write(tmp_path / "u.jsonl", "\ufeff" + json.dumps(chat("Grüße", "こんにちは"),
                                                                                ensure_ascii=False), "utf-16-le"))
    assert report.encoding == "utf-16" and rows[0]["messages"][1]["content"] == "こんにちは"
    # without a BOM, the NUL-in-every-other-byte pattern still identifies UTF-16 (not "binary")
    rows, report = load_file(write(tmp_path / "n.jsonl", '{"text": "no bom"}\n', "utf-16-be"))
    assert report.encoding == "utf-16-be" and rows == [{"text": "no bom"}]


def test_latin1_accents(tmp_path):
    rows, report = load_file(write(tmp_path / "l.jsonl", '{"text": "Café au lait, naïve résumé, crème brûlée"}\n'
                                                        '{"text": "Grüße aus Köln, schöne Straße"}\n', "latin-1"))
    assert report.encoding in ("cp1252", "latin_1", "iso8859_1")
    assert rows[0]["text"] == "Café au lait, naïve résumé, crème brûlée" and "Köln" in rows[1]["text"]


@pytest.mark.parametrize("content", ["", "  \n\t"])
def test_empty_file(tmp_path, content):
    with pytest.raises(DataError, match=r"e\.jsonl: file is empty"):
        load_file(write(tmp_path / "e.jsonl", content))


def test_zero_usable_rows(tmp_path):
    path = jsonl(tmp_path / "z.jsonl", [chat(a=""), {"messages": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(DataError, match=r"z\.jsonl: no usable rows as openai .*empty assistant turn.*line 1"):
        load_file(path)


def test_missing_column(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", [{"instruction": "a", "input": ""}, {"instruction": "b", "input": ""}])
    with pytest.raises(DataError, match=r"m\.jsonl: missing column 'output' \(columns found: input, instruction\); "
                                        r"map one of yours to it \(the data source's columns\) or choose another format"):
        load_file(path)
    with pytest.raises(RowError, match="missing field 'output' — add 'output' to the row, map your own column"):
        normalise_row({"instruction": "a"}, "alpaca")


def test_unknown_role(tmp_path):
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
                             {"from": "bot", "value": "?"}]}
    _, report = load_file(jsonl(tmp_path / "r.jsonl", [SAMPLES["sharegpt"][1], SAMPLES["sharegpt"][1], bad]))
    assert report.skipped[0].reason == ("r.jsonl, line 3: field 'conversations'[2].from: unknown role 'bot' — use one "
                                        "of assistant, function_call, gpt, human, observation, system, tool, user "
                                        "(ShareGPT data can map its own with the columns user_tag, assistant_tag, "
                                        "system_tag), or drop the row")
    with pytest.raises(RowError, match=r"'messages'\[0\]\.role: unknown role 'narrator'"):
        normalise_row({"messages": [{"role": "narrator", "content": "x"}]}, "openai")
    with pytest.raises(RowError, match=r"'messages'\[0\]\.content: a tool result without a tool call"):
        normalise_row({"messages": [{"role": "tool", "content": "x"}]}, "openai")


def test_consecutive_user_turns(tmp_path):
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"}]}
    _, report = load_file(jsonl(tmp_path / "c.jsonl", [chat(), bad]))
    assert report.rows_used == 1
    assert report.skipped[0].reason == ("c.jsonl, line 2: field 'messages'[1].content: two consecutive user turns "
                                        "(not merged) — merge them into one turn or add the assistant turn between "
                                        "them, or drop the row")


def test_system_not_first_and_non_string_content():
    with pytest.raises(RowError, match=r"'messages'\[1\]\.content: system message is not first"):
        normalise_row({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]}, "openai")
    with pytest.raises(RowError, match=r"'messages'\[1\]\.content: expected a string, got an int"):
        normalise_row({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 4}]}, "openai")
    with pytest.raises(RowError, match="row is a list, expected an object"):
        normalise_row([1, 2], "alpaca")


def test_empty_assistant_turn(tmp_path):
    rows = [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": "   "}]
    _, report = load_file(jsonl(tmp_path / "a.jsonl", rows))
    assert report.rows_used == 1
    assert report.skipped[0].reason == "a.jsonl, line 2: field 'output': empty assistant turn — give it a reply, or drop the row"


def test_binary_file_named_json(tmp_path):
    path = tmp_path / "model.json"
    path.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(DataError, match=r"model\.json: looks binary"):
        load_file(path)


def test_csv_quoted_newlines(tmp_path):
    path = write(tmp_path / "d.csv", 'instruction,output\n"Write a poem\nabout rain","Drip,\ndrop.\n\nThe end."\n'
                                     'NA,null\n')
    rows, report = load_file(path)
    assert report.format == "alpaca" and report.rows_used == 2
    assert rows[0]["messages"][1]["content"] == "Drip,\ndrop.\n\nThe end."
    assert rows[1]["messages"] == [{"role": "user", "content": "NA"}, {"role": "assistant", "content": "null"}]
    rows, _ = load_file(write(tmp_path / "d.tsv", "text\nrow one\nrow two\n"))
    assert rows == [{"text": "row one"}, {"text": "row two"}]


def test_parquet_chat_and_wrong_types(tmp_path):
    pq.write_table(pa.Table.from_pylist([chat(), chat("a", "b")]), tmp_path / "ok.parquet")
    rows, report = load_file(tmp_path / "ok.parquet")
    assert report.format == "openai" and rows[1] == chat("a", "b")
    # An int answer column is not coerced to str: each row is a RowError naming the field.
    pq.write_table(pa.table({"instruction": ["q1", "q2"], "output": [1, 2]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: .*row 1: field 'output': expected a string, got an int"):
        load_file(tmp_path / "bad.parquet")


def test_every_skip_says_file_row_field_problem_and_fix(tmp_path):
    """A skipped row's message names the file, the row, the field, what is wrong, and what to do."""
    rows = [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": ""}, {"instruction": "q", "output": 3},
            {"instruction": "q"}, {"instruction": "q", "output": "a", "history": "x"},
            {"instruction": "q", "output": "a", "history": [["only one"]]}, {"instruction": "q", "output": "a", "system": 1}]
    _, report = load_file(jsonl(tmp_path / "every.jsonl", rows))
    chats = [{"messages": [{"role": "assistant", "content": "a"}]},
             {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                           {"role": "assistant", "content": "a"}]},
             {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "21"},
                           {"role": "assistant", "content": "a"}]},
             {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                           {"role": "assistant", "content": "a"}]},
             {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": "{no"},
             {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, chat(), chat()]
    _, chat_report = load_file(jsonl(tmp_path / "chats.jsonl", chats))
    skipped = report.skipped + chat_report.skipped
    assert len(skipped) == 6 + 6, [s.reason for s in skipped]
    for s in skipped:
        file, rest = s.reason.split(", ", 1)
        assert file in ("every.jsonl", "chats.jsonl") and rest.startswith(f"line {s.row}: "), s.reason
        problem, fix = rest.split(" — ")
        assert "field '" in problem or "field " in problem, s.reason
        assert fix.split()[0] in ("give", "make", "add", "write", "start", "move", "list", "remove", "correct",
                                  "use", "put", "merge", "mark"), s.reason


def test_deeply_nested_json(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(DataError, match=r"deep\.json: JSON is nested too deeply"):
        load_file(write(tmp_path / "deep.json", deep))
    rows, report = load_file(write(tmp_path / "deep.jsonl", json.dumps(chat()) + "\n" + deep + "\n"))
    assert report.rows_used == 1
    assert report.skipped[0].reason == "deep.jsonl, line 2: JSON nested too deeply — flatten the row or delete the line"


def test_unsupported_extension(tmp_path):
    with pytest.raises(DataError, match=r"data\.xlsx: unsupported file type '\.xlsx' \(supported: .*\.jsonl"):
        load_file(write(tmp_path / "data.xlsx", "x"))


def test_missing_file_no_rows_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match=r"n\.json: holds no rows"):
        load_file(write(tmp_path / "n.json", "[]"))
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_file(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"f\.jsonl: no format detected \(keys seen: a, b\)"):
        load_file(jsonl(tmp_path / "f.jsonl", [{"a": 1, "b": 2}]))


def test_column_mapping_override(tmp_path):
    # Auto-detection does not recognise these files; a forced format plus mapping does.
    path = jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "context": "math", "answer": "4", "sys": "Be brief."}])
    with pytest.raises(DataError, match="no format detected"):
        load_file(path)
    cols = {"instruction": "question", "output": "answer", "input": "context", "system": "sys"}
    rows, report = load_file(path, "alpaca", cols)
    assert rows[0]["messages"] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "2+2?\nmath"}, {"role": "assistant", "content": "4"}]
    path = jsonl(tmp_path / "sg.jsonl", [{"turns": [{"speaker": "USER", "utterance": "hi"},
                                                    {"speaker": "BOT", "utterance": "hello"}]}])
    cols = {"conversations": "turns", "from": "speaker", "value": "utterance", "user_tag": "USER", "assistant_tag": "BOT"}
    rows, report = load_file(path, "sharegpt", cols)
    assert rows == [chat("hi", "hello")] and detect_format([{"turns": []}], cols) == "sharegpt"
    rows, _ = load_file(jsonl(tmp_path / "dl.jsonl", [{"dialog": chat()["messages"]}]), "auto", {"messages": "dialog"})
    assert rows == [chat()]
    rows, _ = load_file(jsonl(tmp_path / "t.jsonl", [{"content": "abc"}]), "text", {"text": "content"})
    assert rows == [{"text": "abc"}]


def test_placeholders_filled_everywhere():
    row = {"instruction": "Who is {{author}}?", "output": "I am {{name}}, by {{author}}. {{other}}"}
    ex = normalise_row(row, "alpaca", placeholders=IDENTITY)
    assert ex["messages"][1]["content"] == "I am Lumen, by LoRA Studio. {{other}}"
    assert ex["messages"][0]["content"] == "Who is LoRA Studio?"


# ----------------------------------------------------------------------------- mixtures and hashing

def test_mixture_ratios_exact_and_deterministic(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [chat(f"a{i}", "x") for i in range(10)])
    b = jsonl(tmp_path / "b.jsonl", [chat(f"b{i}", "y") for i in range(4)])
    sources = [{"path": str(a), "ratio": 0.5}, {"path": str(b), "ratio": 2.5}]
    ds, reports = load_mixture(sources, seed=1)
    assert ds.column_names == ["chat"] and len(ds) == 5 + 10 and len(reports) == 2
    users = Counter(example_of(ex)["messages"][0]["content"] for ex in ds)
    assert sum(n for k, n in users.items() if k.startswith("a")) == 5 and max(users[f"a{i}"] for i in range(10)) == 1
    b_counts = sorted(users[f"b{i}"] for i in range(4))
    assert b_counts == [2, 2, 3, 3]  # two whole copies + a seeded remainder of 2
    again, _ = load_mixture(sources, seed=1)
    assert again.to_list() == ds.to_list()
    other, _ = load_mixture(sources, seed=2)
    assert other.to_list() != ds.to_list()


def test_mixture_text_only(tmp_path):
    t = write(tmp_path / "t.txt", "one\ntwo\nthree\n")
    ds, _ = load_mixture([str(t)], seed=0)
    assert ds.column_names == ["text"] and sorted(ds["text"]) == ["one", "three", "two"]


def test_mixture_chat_and_text_refused(tmp_path):
    c = jsonl(tmp_path / "chat.jsonl", [chat()])
    t = write(tmp_path / "plain.txt", "some text\n")
    with pytest.raises(DataError, match=r"chat\.jsonl \(chat\) vs plain\.txt \(text\)"):
        load_mixture([{"path": str(c)}, {"path": str(t)}])


def test_dataset_hash_stable_and_sensitive(tmp_path):
    path = jsonl(tmp_path / "h.jsonl", [chat()])
    src = [{"path": str(path), "format": "auto", "ratio": 1}]
    h = dataset_hash(src)
    assert h == dataset_hash([{"path": str(path), "ratio": 1.0, "format": "auto"}]) and len(h) == 64
    assert dataset_hash([{**src[0], "ratio": 0.5}]) != h
    assert dataset_hash([{**src[0], "columns": {"messages": "dialog"}}]) != h
    jsonl(path, [chat(a="changed")])
    assert dataset_hash(src) != h
