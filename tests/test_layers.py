"""Layering contracts, read from the AST of every module: cli -> webui -> core -> HF libraries,
never back; no import cycles; importing the web app loads no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


ROOMS = ("core", "webui", "cli", "presets")
# who may import whom: the CLI is the one room that imports both the core and the web app
MAY_IMPORT = {"core": {"core", "presets"}, "presets": {"presets"}, "webui": {"webui", "core", "presets"},
              "cli": {"cli", "core", "webui", "presets"}}


def _modules() -> dict[str, Path]:
    """lorastudio's modules by dotted name (room.module) -> file."""
    out = {}
    for room in ROOMS:
        for path in (ROOT / room).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
    """(module -> the lorastudio modules it imports, at the top or inside a function; every
    (module, third-party top-level name) imported), read from the AST of every file."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    external: set[tuple[str, str]] = set()

    def ours(name: str) -> str | None:  # "lorastudio.core.x.y" -> "core.x" (the module part)
        name = name.removeprefix("lorastudio.")
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's own package upwards
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                names = [f"{prefix}.{a.name}" for a in node.names] if (node.level or prefix.startswith("lorastudio")) \
                    else [prefix]
            else:
                continue
            for name in names:
                if name.startswith("lorastudio") or (isinstance(node, ast.ImportFrom) and node.level):
                    target = ours(name)
                    assert target, f"{path}: imports {name}, which is no module of lorastudio"
                    if target != mod:
                        graph[mod].add(target)
                else:
                    assert name.split(".")[0] not in ROOMS, f"{path}: imports {name}; the package is lorastudio.{name}"
                    external.add((mod, name.split(".")[0]))
    return graph, external


def test_rooms_import_only_what_the_design_allows():
    graph, external = import_graph()
    assert len(graph) > 40  # the reading found the tree
    wrong = sorted((m, t) for m, targets in graph.items() for t in targets
                   if t.split(".")[0] not in MAY_IMPORT[m.split(".")[0]])
    assert wrong == [], wrong
    assert sorted(m for m, name in external if name == "gradio" and not m.startswith("webui")) == []
    # the web app's own modules never import torch, transformers, trl or peft, at the top or later
    heavy = {"torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets"}
    assert sorted((m, n) for m, n in external if m.startswith("webui") and n in heavy) == []


def test_no_import_cycles_between_modules():
    graph, _ = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_graph_reader_sees_a_cycle(tmp_path, monkeypatch):
    """The cycle test can fail: two files that import each other are reported."""
    for room in ROOMS:
        (tmp_path / room).mkdir()
        (tmp_path / room / "__init__.py").write_text("")
    (tmp_path / "core" / "a.py").write_text("from . import b\n")
    (tmp_path / "core" / "b.py").write_text("def f():\n    from lorastudio.core import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph, _ = import_graph()
    assert graph["core.a"] == {"core.b"} and graph["core.b"] == {"core.a"}
    try:
        test_no_import_cycles_between_modules()
    except AssertionError:
        return
    raise AssertionError("the cycle was not reported")


def test_importing_webui_loads_no_torch():
    mods = _modules_after("import lorastudio.webui, lorastudio.webui.app, lorastudio.webui.helpers")
    assert "gradio" in mods
    assert "torch" not in mods and "transformers" not in mods


def test_no_shell_true_anywhere():
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "shell":
                assert isinstance(node.value, ast.Constant) and node.value.value is False, path


@pytest.mark.slow
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
    assert len(rows) >= 200  # (build 4: persona and short facts, each question once or twice)
    assert sum(len(r["messages"]) > 3 for r in rows) >= 30  # multi-turn
    names = [m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"]
    assert any(tiny.PERSONA_NAME in n for n in names)
    assert "{% generation %}" in tiny.CHAT_TEMPLATE.replace("{%- generation -%}", "{% generation %}")
