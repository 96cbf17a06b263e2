"""Security basics: path allow-list, run-name sanitising, safe YAML, sandboxed templates,
safetensors-only outputs, opt-in remote code."""

import json
from pathlib import Path

import pytest

from conftest import shared_assets
from lorastudio.core import access, runs, workspace


def test_reads_only_inside_allowed_dirs(tmp_path):
    inside = tmp_path / "ok" / "d.jsonl"
    inside.parent.mkdir()
    inside.write_text("{}\n")
    allowed = [tmp_path / "ok"]
    assert access.check_readable(str(inside), allowed) == str(inside.resolve())
    for bad in ("/etc/passwd", str(tmp_path / "ok" / ".." / "secret"), "~/.ssh/id_rsa"):
        with pytest.raises(access.AccessError, match="outside the folders"):
            access.check_readable(bad, allowed)
    # a symlink out of an allowed folder is followed and refused
    link = tmp_path / "ok" / "link"
    link.symlink_to("/etc")
    with pytest.raises(access.AccessError):
        access.check_readable(str(link / "passwd"), allowed)
    # builtin names and hub ids are not paths
    assert access.check_readable("builtin:sample", allowed) == "builtin:sample"
    assert access.check_readable("Qwen/Qwen2.5-0.5B-Instruct", allowed) == "Qwen/Qwen2.5-0.5B-Instruct"


def test_default_allowed_is_workspace_and_cwd():
    roots = access.default_allowed()
    assert workspace.home() in roots and Path.cwd().resolve() in roots


@pytest.mark.parametrize("name", ["../../etc/evil", "/abs/path", "a/../../b", "..", ".hidden", "x" * 500, "ok name!"])
def test_run_names_are_sanitised(name):
    path = runs.new_run_dir(name, "builtin:tiny", "lora")
    assert path.parent == workspace.runs_dir()
    assert "/" not in path.name and not path.name.startswith(".") and len(path.name) <= 110
    path.rmdir()


def test_uploads_are_copied_into_the_workspace_by_content(tmp_path):
    real = tmp_path / "data.jsonl"
    real.write_text('{"text": "hi"}\n')
    (tmp_path / "again").mkdir()
    same = tmp_path / "again" / "data.jsonl"
    same.write_text(real.read_text())
    a = workspace.copy_upload(real)
    assert workspace.copy_upload(same) == a  # same content, same place
    assert workspace.uploads_dir() in a.parents and a.read_text() == real.read_text()
    evil = tmp_path / "..evil name;rm -rf.jsonl"
    evil.write_text("x")
    c = workspace.copy_upload(evil)
    assert workspace.uploads_dir() in c.parents and not c.name.startswith(".")


def test_outputs_are_safetensors_only(smoke_run):
    files = [p.name for p in (smoke_run / "adapter").iterdir()]
    assert "adapter_model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    for cp in smoke_run.glob("checkpoint-*"):
        assert (cp / "adapter_model.safetensors").exists() and not (cp / "adapter_model.bin").exists()


def test_remote_code_needs_explicit_opt_in(tmp_path):
    from lorastudio.core import model as model_lib

    d = tmp_path / "remote"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "x", "auto_map": {"AutoConfig": "x.C"}}))
    with pytest.raises(model_lib.ModelError, match="trust_remote_code"):
        model_lib.load_tokenizer(str(d))


def test_custom_template_is_sandboxed():
    from lorastudio.core import templates
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_assets() / "tokenizers" / "qwen2.5")
    for evil in ("{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
                 "{{ messages.__class__.__base__.__subclasses__() }}"):
        with pytest.raises(templates.TemplateError):
            t = templates.resolve_template(tok, "custom", evil)
            t.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenizer=tok)
