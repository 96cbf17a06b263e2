"""Layering contracts: webui -> core -> HF, never back; importing webui loads no torch."""

import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_importing_webui_loads_no_torch():
    mods = _modules_after("import lorastudio.webui, lorastudio.webui.app, lorastudio.webui.helpers")
    assert "gradio" in mods
    assert "torch" not in mods and "transformers" not in mods


def test_core_never_imports_gradio():
    mods = _modules_after("import lorastudio.core.config, lorastudio.core.data, lorastudio.core.dataset, "
                          "lorastudio.core.generate, lorastudio.core.model, lorastudio.core.preview, "
                          "lorastudio.core.runs, lorastudio.core.templates, lorastudio.core.tiny, "
                          "lorastudio.core.train, lorastudio.core.workspace")
    assert "gradio" not in mods
    for path in (ROOT / "core").glob("*.py"):
        assert "import gradio" not in path.read_text(), path


def test_no_shell_true_anywhere():
    for path in list((ROOT / "core").glob("*.py")) + list((ROOT / "webui").glob("*.py")):
        assert "shell=True" not in path.read_text(), path


def test_tiny_default_is_deterministic_and_offline(tmp_path):
    """Two fresh workspaces build byte-identical tiny models and samples, with no network."""
    import hashlib
    import os

    digests = []
    for name in ("a", "b"):
        home = tmp_path / name
        code = "from lorastudio.core import tiny; print(tiny.ensure_built())"
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "LORASTUDIO_HOME": str(home), "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 0, out.stderr
        root = Path(out.stdout.strip().splitlines()[-1])
        files = sorted(p for p in root.rglob("*") if p.is_file())
        digests.append({p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    assert digests[0] == digests[1]
    assert {"model/model.safetensors", "model/tokenizer.json", "sample_chat.jsonl"} <= set(digests[0])


def test_sample_dataset_shape():
    from lorastudio.core import tiny

    rows = tiny.sample_conversations()
    assert len(rows) >= 300
    assert sum(len(r["messages"]) > 3 for r in rows) >= 30  # multi-turn
    names = [m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"]
    assert any(tiny.PERSONA_NAME in n for n in names)
    assert "{% generation %}" in tiny.CHAT_TEMPLATE.replace("{%- generation -%}", "{% generation %}")
