"""Bad input: every case gets a message that names the file, row or field — in the CLI and in
the web app (whose server stays up) — with no traceback and nothing written outside the workspace.

Each case: files it writes, how it is fed (data file, config, model folder or template), the
exit code, and words the message must contain."""

import json
from pathlib import Path

import pytest

from conftest import ROOT, lorastudio, shared_assets
from lorastudio.cli import commands as cli

GOOD = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]


def jl(rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def chat(*msgs):
    return {"messages": [{"role": r, "content": c} for r, c in msgs]}


# (id, filename, content (str | bytes | callable(path)), exit code, [substrings])
DATA_CASES = [
    ("invalid-jsonl-line", "d.jsonl", jl(GOOD + ["{oops"] + GOOD), 0, ["d.jsonl", "1 skipped", "d.jsonl, line 2", "invalid JSON", "— correct the JSON"]),
    ("utf16-bom", "d.jsonl", jl(GOOD).encode("utf-16"), 0, ["d.jsonl", "1 used", "0 skipped"]),
    ("latin1", "d.jsonl", jl([chat(("user", "café?"), ("assistant", "crème brûlée"))]).encode("latin-1"), 0,
     ["1 used"]),
    ("empty-file", "d.jsonl", "", 2, ["d.jsonl", "empty"]),
    ("whitespace-only", "d.json", "  \n\n ", 2, ["d.json", "empty"]),
    ("zero-usable-rows", "d.jsonl", jl([chat(("user", "a"))] * 3), 2, ["d.jsonl", "no usable rows"]),
    ("missing-column", "d.json", json.dumps([{"instruction": "x", "answer": "y"}]), 2,
     ["d.json", "output", "map one of yours to it"]),
    ("unknown-role", "d.jsonl", jl(GOOD + [chat(("user", "a"), ("robot", "b"))]), 0,
     ["1 skipped", "d.jsonl, line 2", "unknown role", "robot", "— use one of"]),
    ("consecutive-user", "d.jsonl", jl(GOOD + [chat(("user", "a"), ("user", "b"), ("assistant", "c"))]), 0,
     ["line 2", "consecutive user", "— merge them into one turn"]),
    ("empty-assistant", "d.jsonl", jl(GOOD + [chat(("user", "a"), ("assistant", "  "))]), 0,
     ["line 2", "empty assistant", "— give it a reply, or drop the row"]),
    ("binary-named-json", "d.json", bytes(range(256)) * 4, 2, ["d.json", "binary"]),
    ("csv-quoted-newlines", "d.csv", 'instruction,output\n"line one\nline two","an\nanswer"\n', 0, ["d.csv", "1 used"]),
    ("deeply-nested", "d.json", "[" * 100000 + "]" * 100000, 2, ["d.json", "nested too deeply"]),
    ("unsupported-extension", "d.xlsx", "x", 2, ["d.xlsx", ".xlsx"]),
    ("not-a-list", "d.json", json.dumps("just a string"), 2, ["d.json"]),
    ("row-not-object", "d.jsonl", jl(GOOD + ["42"]), 0, ["line 2", "— write the row as a JSON object"]),
    ("missing-data-file", None, None, 2, ["nope.jsonl", "not found"]),
]


def _parquet_wrong_types(path: Path):
    import pandas as pd

    pd.DataFrame({"instruction": ["a", "b"], "output": [1, 2]}).to_parquet(path)


DATA_CASES.append(("parquet-wrong-types", "d.parquet", _parquet_wrong_types, 2,
                   ["d.parquet", "output", "int", "make it a string"]))


def _write(tmp_path, name, content):
    if name is None:
        return tmp_path / "nope.jsonl"
    path = tmp_path / name
    if callable(content):
        content(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_data_cases_cli(tmp_path, capsys, case):
    _id, name, content, code, words = case
    path = _write(tmp_path, name, content)
    got, out, err = run_cli(capsys, "preview", "--model", "builtin:tiny", "--data", str(path), "-n", "1")
    assert got == code, (out, err)
    for w in words:
        assert w in err, (w, err)
    assert "Traceback" not in err


def _model_dirs(tmp_path):
    not_model = tmp_path / "junk"
    not_model.mkdir()
    (not_model / "notes.txt").write_text("hello")
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "custom", "auto_map": {"AutoModel": "x.Y"}}))
    return {"missing": tmp_path / "no-such-model", "not-a-model": not_model, "remote-code": remote}


MODEL_CASES = [
    ("missing", ["folder not found"]),
    ("not-a-model", ["not a model folder"]),
    ("remote-code", ["trust_remote_code"]),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_model_cases_cli(tmp_path, capsys, case):
    key, words = case
    model = _model_dirs(tmp_path)[key]
    data = _write(tmp_path, "d.jsonl", jl(GOOD))
    code, out, err = run_cli(capsys, "preview", "--model", str(model), "--data", str(data))
    assert code == 2
    assert str(model) in err or key == "remote-code"
    for w in words:
        assert w in err


TEMPLATE_CASES = [
    ("jinja-syntax-error", "{% for m in messages %}{{ m.content }", ["line 1"]),
    ("template-raises", "{{ raise_exception('roles must alternate') }}", ["roles must alternate"]),
    ("sandbox-escape", "{{ ''.__class__.__mro__ }}", ["unsafe"]),
    ("marks-nothing", "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}",
     ["marks no assistant tokens"]),
]


@pytest.mark.parametrize("case", TEMPLATE_CASES, ids=[c[0] for c in TEMPLATE_CASES])
def test_template_cases_cli(tmp_path, capsys, case):
    _id, source, words = case
    tpl = tmp_path / "t.jinja"
    tpl.write_text(source)
    data = _write(tmp_path, "d.jsonl", jl(GOOD))
    code, out, err = run_cli(capsys, "preview", "--model", "builtin:tiny", "--data", str(data),
                             "--template", "custom", "--custom-template", str(tpl))
    assert code == 2, err
    for w in words:
        assert w.lower() in err.lower(), (w, err)


def test_unknown_named_template_and_no_template_model(tmp_path, capsys):
    data = _write(tmp_path, "d.jsonl", jl(GOOD))
    code, _o, err = run_cli(capsys, "preview", "--model", "builtin:tiny", "--data", str(data), "--template", "klingon")
    assert code == 2 and "klingon" in err
    gpt2 = shared_assets() / "tokenizers" / "gpt2"
    code, _o, err = run_cli(capsys, "preview", "--model", str(gpt2), "--data", str(data))
    assert code == 2 and "no chat template" in err


CONFIG_CASES = [
    ("unknown-key", "training:\n  epochz: 3\n", ["training.epochz: unknown key"]),
    ("wrong-type", "lora:\n  r: sixteen\n", ["lora.r"]),
    ("negative-lr", "training:\n  learning_rate: -0.1\n", ["training.learning_rate", "greater than 0"]),
    ("zero-batch", "training:\n  micro_batch_size: 0\n", ["training.micro_batch_size"]),
    ("not-yaml", "training: [\n", ["not valid YAML"]),
    ("qlora-full", "method: full\nquantization:\n  bits: 4\n", ["quantization.bits"]),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_cases_cli(tmp_path, capsys, case):
    _id, text, words = case
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code, _o, err = run_cli(capsys, "train", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert code == 2
    assert str(cfg) in err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "run" / "run.json").exists()  # nothing started


def test_bad_set_override(tmp_path, capsys):
    code, _o, err = run_cli(capsys, "train", "presets/tiny_smoke.yaml", "--set", "training.learning_rate",
                            "--run-dir", str(tmp_path / "r"))
    assert code == 2 and "key.path=value" in err


def test_nothing_written_outside_the_workspace(tmp_path, capsys):
    """Bad-input handling writes nothing into the source tree or next to the user's files."""
    before = {p for p in ROOT.rglob("*") if ".git" not in p.parts and ".venv" not in p.parts
              and "__pycache__" not in p.parts and ".pytest_cache" not in p.parts}
    data_dir = tmp_path / "user"
    data_dir.mkdir()
    for _id, name, content, _c, _w in DATA_CASES:
        if name:
            p = _write(data_dir, name, content)
            run_cli(capsys, "preview", "--model", "builtin:tiny", "--data", str(p))
            p.unlink()
    after = {p for p in ROOT.rglob("*") if ".git" not in p.parts and ".venv" not in p.parts
             and "__pycache__" not in p.parts and ".pytest_cache" not in p.parts}
    assert after - before == set()
    assert list(data_dir.iterdir()) == []


def test_retry_of_a_run_that_did_not_fail_is_refused(tmp_path):
    """Retry is for failed runs (the web app and the CLI share core.recovery's rule): a finished run
    starts nothing and the command says why."""
    import shutil

    run_dir = tmp_path / "done-run"
    shutil.copytree(ROOT / "tests" / "fixtures" / "run-318d927", run_dir)
    res = lorastudio("retry", str(run_dir))
    assert res.returncode == 2 and "only a failed run can be retried (done-run is done)" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done-run"]  # no retry folder was made
