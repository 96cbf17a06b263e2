"""GGUF export (issue 21): the demo run through llama.cpp's own converter and quantizer, verified
against the merged model, chatted with through llama.cpp, an Ollama Modelfile beside it; a QLoRA
run through its 16-bit merge; refusals. Real files, real child processes, the [gguf] extra."""

import json
import os
import re
import shutil

import pytest

from conftest import copy_run, lorastudio
from lorastudio.core import chat, generate, runs, tiny


def _need_gguf_extra():
    """The [gguf] extra: skip without it, FAIL under CI=true (.ci/run installs it)."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the [gguf] extra is missing ({e}); required when CI=true")
        pytest.skip(f"the [gguf] extra is not installed ({e})")


_need_gguf_extra()


def ask(q):
    return [{"role": "user", "content": q}]


def export(run_dir, qtype, *extra):
    out = lorastudio("convert", str(run_dir), "--gguf", qtype, *extra)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def gguf_run(demo_run):
    """The trained demo run, copied: its merged/ and gguf-*/ here leave demo_run as other files expect it."""
    return copy_run(demo_run, "demo-gguf")


@pytest.fixture(scope="module")
def f16(gguf_run):
    out = export(gguf_run, "f16")
    assert "no merge yet" in out.stdout and "verification PASSED" in out.stdout
    return gguf_run / "gguf-f16"


@pytest.fixture(scope="module")
def q8(gguf_run, f16):  # after f16: the merge f16 made is reused
    out = export(gguf_run, "q8_0")
    assert "reusing the verified merge" in out.stdout and "llama_model_quantize" in out.stdout
    return gguf_run / "gguf-q8_0"


@pytest.fixture(scope="module")
def merged_chat(gguf_run, f16):
    return chat.load_chat_model(gguf_run / "merged")


def answers(target_or_loaded, prompts, **gen):
    model, tok, tpl = chat.load_chat_model(target_or_loaded) if not isinstance(target_or_loaded, tuple) \
        else target_or_loaded
    try:
        return [generate.reply(model, tok, tpl, ask(q), greedy=True, max_new_tokens=48, **gen) for q in prompts]
    finally:
        if getattr(model, "is_gguf", False):
            model.close()


PERSONA_Q = [q for q, _ in tiny.PERSONA]


# ---------------------------------------------------------------- f16 and q8_0 against the merge

def test_f16_export_answers_as_the_merged_model(gguf_run, f16, merged_chat):
    demo_run = gguf_run
    assert sorted(p.name for p in f16.iterdir()) == ["Modelfile", "lorastudio.json", "model-f16.gguf", "tokenizer",
                                                      "verification.json"]
    report = json.loads((f16 / "verification.json").read_text())
    v = report["verification"]
    assert next(iter(report)) == "passed" and report["passed"] is True and v["passed"]
    assert v["answers"]["identical"] == v["answers"]["prompts"] >= 8
    assert v["answers"]["top1_agreement"] == 1.0 and all(v["metadata"]["checks"].values())
    # llama.cpp's own tokenizer (what Ollama feeds the model) splits every prompt as training did:
    # the converter read the base's SentencePiece merge scores, not a tokenizer.json at -1000 each
    assert v["tokenization"]["passed"] and v["warnings"] == [], v["warnings"]
    assert all(r["own_tokenization_identical"] for r in v["answers"]["rows"])
    assert report["architecture"] == "LlamaForCausalLM" and report["merged"] == str(demo_run / "merged")
    # the run's sample prompts are among the verified ones
    from lorastudio.core import config as config_lib

    asked = [r["prompt"] for r in v["answers"]["rows"]]
    assert set(config_lib.load(demo_run / "config.yaml").training.sample_prompts) <= set(asked)

    # the persona through llama.cpp, greedy, as the merged model (transformers) answers it
    want = answers(merged_chat, PERSONA_Q)
    got = answers(f16 / "model-f16.gguf", PERSONA_Q)
    assert got == want
    assert sum(g == a for g, (_q, a) in zip(got, tiny.PERSONA)) >= 0.9 * len(tiny.PERSONA)
    ev = [e for e in runs.read_events(demo_run)[0] if e["event"] == "convert_end" and e.get("kind") == "gguf"]
    assert ev and ev[-1]["verification"]["passed"] is True


def test_q8_0_export_agrees_with_the_merged_model(q8, merged_chat):
    report = json.loads((q8 / "verification.json").read_text())
    v = report["verification"]
    print(f"q8_0: top-1 {v['answers']['top1_agreement']:.2%}, identical {v['answers']['identical']}/"
          f"{v['answers']['prompts']}, {report['size_bytes']} bytes")
    assert report["passed"] is True and v["criterion"] == "top-1 agreement >= 95%"
    assert v["answers"]["top1_agreement"] >= 0.95 and all(v["metadata"]["checks"].values())
    assert report["size_bytes"] < (q8.parent / "gguf-f16" / "model-f16.gguf").stat().st_size * 0.7
    import gguf

    types = {t.tensor_type.name for t in gguf.GGUFReader(str(q8 / "model-q8_0.gguf")).tensors}
    assert "Q8_0" in types  # quantized by llama.cpp, not a renamed f16
    want = answers(merged_chat, PERSONA_Q)
    got = answers(q8 / "model-q8_0.gguf", PERSONA_Q)
    assert sum(g == w for g, w in zip(got, want)) >= 0.9 * len(want), list(zip(got, want))


def test_cli_chat_with_the_gguf_and_no_overwrite(gguf_run, f16):
    demo_run = gguf_run
    gguf_file = f16 / "model-f16.gguf"
    for q, a in tiny.PERSONA[:2]:
        out = lorastudio("chat", str(gguf_file), "--prompt", q, "--greedy")
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout == a + "\n" and out.stderr == ""  # the answer alone, llama.cpp quiet
    sampled = lorastudio("chat", str(gguf_file), "--prompt", "Who are you?", "--temperature", "0.8",
                         "--max-new-tokens", "16")
    assert sampled.returncode == 0 and sampled.stdout.strip()
    again = lorastudio("convert", str(demo_run), "--gguf", "f16")
    assert again.returncode == 2 and "already exists" in again.stderr and "not overwriting" in again.stderr
    assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1
    bad = lorastudio("convert", str(demo_run), "--gguf", "q9_9", "--out", str(f16.parent / "nope"))
    assert bad.returncode == 2 and "q9_9" in bad.stderr and "q4_k_m" in bad.stderr
    assert not (f16.parent / "nope").exists()
    ck = lorastudio("convert", str(demo_run), "--gguf", "f16", "--checkpoint", "99999")
    assert ck.returncode == 2 and "no adapter" in ck.stderr and "checkpoint-99999" in ck.stderr
    assert not (demo_run / "gguf-f16-ckpt99999").exists()
    log = (demo_run / "convert.log").read_text()
    assert "[llama.cpp] INFO:hf-to-gguf:" in log  # the converter's lines, marked as its own
    assert not [l for l in log.splitlines() if l.strip() and not l.startswith("[")], log[-3000:]


def test_chat_worker_serves_the_gguf(f16):
    worker = chat.ChatWorker(f16 / "model-f16.gguf")
    try:
        info = worker.info()
        assert info["device"] == "cpu (llama.cpp)" and info["template"] == "auto" and info["eot_token"] == "<|im_end|>"
        q, a = tiny.PERSONA[0]
        chunks = list(worker.stream(ask(q), greedy=True))
        assert "".join(chunks) == a
    finally:
        worker.close()


# ---------------------------------------------------------------- the Ollama Modelfile

def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """Ollama's Modelfile grammar: `# comment`, `INSTRUCTION args` where args is a bare rest of
    line, a "quoted string" (backslash escapes) or a \"\"\"triple-quoted\"\"\" block over lines;
    PARAMETER's args are `name value`. Instructions are case-insensitive; FROM is required."""
    out, i = [], 0
    known = {"FROM", "TEMPLATE", "SYSTEM", "PARAMETER", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"}
    while i < len(text):
        line_end = text.find("\n", i)
        line_end = len(text) if line_end < 0 else line_end
        line = text[i:line_end]
        if not line.strip() or line.lstrip().startswith("#"):
            i = line_end + 1
            continue
        m = re.match(r"\s*(\w+)\s+", line)
        assert m and m.group(1).upper() in known, f"not an instruction: {line!r}"
        name, j = m.group(1).upper(), i + m.end()
        if text.startswith('"""', j):
            end = text.index('"""', j + 3)
            value, i = text[j + 3:end], end + 3
            assert text[i:text.find("\n", i) if "\n" in text[i:] else len(text)].strip() == ""
        else:
            value, i = text[j:line_end].strip(), line_end + 1
        if name == "PARAMETER":
            key, _, raw = value.partition(" ")
            raw = raw.strip()
            if raw.startswith('"'):
                assert raw.endswith('"') and len(raw) >= 2, raw
                raw = json.loads(raw)  # Ollama's quoted strings escape like JSON's for these
            value = (key, raw)
        out.append((name, value))
    assert [n for n, _ in out].count("FROM") == 1
    return out


def go_render(template: str, messages: list[dict]) -> str:
    """A small interpreter of Go's text/template for what a chat TEMPLATE uses: range over
    .Messages with $i/$m, variables, if / else if / end, eq ne and not len slice, .Role .Content."""
    tokens = re.split(r"(\{\{.*?\}\})", template, flags=re.S)

    def value(expr: str, env: dict):
        expr = expr.strip()
        if expr.startswith("(") and expr.endswith(")"):
            return value(expr[1:-1], env)
        parts = re.findall(r'\((?:[^()]|\([^()]*\))*\)|"(?:[^"\\]|\\.)*"|\S+', expr)
        if len(parts) > 1:
            fn, args = parts[0], [value(p, env) for p in parts[1:]]
            return {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda *a: all(a),
                    "or": lambda *a: any(a), "not": lambda a: not a, "len": len,
                    "slice": lambda s, i: s[i:]}[fn](*args)
        if expr.startswith('"') or expr.lstrip("-").isdigit():
            return json.loads(expr)
        if expr in ("$.Messages", ".Messages"):
            return messages
        name, _, field = expr.partition(".")
        base = env[name]
        return base[field.lower()] if field else base

    def run(pos: int, env: dict, out: list[str] | None) -> int:
        """Render tokens from POS until {{ end }} / {{ else ... }} at this level; return its index."""
        while pos < len(tokens):
            tok = tokens[pos]
            if not tok.startswith("{{"):
                if out is not None:
                    out.append(tok)
                pos += 1
                continue
            action = tok[2:-2].strip()
            if action == "end" or action.startswith("else"):
                return pos
            if action.startswith("range "):
                m = re.match(r"range \$(\w+), \$(\w+) := (.+)", action)
                items = value(m.group(3), env)
                end = None
                for idx, item in enumerate(items or []):
                    end = run(pos + 1, {**env, "$" + m.group(1): idx, "$" + m.group(2): item}, out)
                if end is None:
                    end = run(pos + 1, env, None)
                pos = end + 1
            elif action.startswith("if "):
                taken = False
                cond = action[3:]
                while True:
                    ok = not taken and bool(value(cond, env))
                    end = run(pos + 1, env, out if ok else None)
                    taken = taken or ok
                    nxt = tokens[end][2:-2].strip()
                    pos = end
                    if nxt == "end":
                        break
                    cond = nxt[len("else if "):] if nxt.startswith("else if ") else "true_"
                    env = {**env, "true_": True}
                pos += 1
            elif re.match(r"\$\w+ := ", action):
                name, expr = action.split(" := ", 1)
                env[name] = value(expr, env)
                pos += 1
            else:
                if out is not None:
                    out.append(str(value(action, env)))
                pos += 1
        return pos

    out: list[str] = []
    run(0, {}, out)
    return "".join(out)


def test_modelfile_parses_and_stops_where_the_run_does(gguf_run, f16):
    demo_run = gguf_run
    from transformers import AutoTokenizer

    entries = parse_modelfile((f16 / "Modelfile").read_text())
    assert ("FROM", "./model-f16.gguf") in entries
    stops = [v[1] for n, v in entries if n == "PARAMETER" and v[0] == "stop"]
    meta = json.loads((demo_run / "adapter" / "lorastudio.json").read_text())
    run_tok = AutoTokenizer.from_pretrained(demo_run / "adapter")
    expected = [meta["eot_token"]] + [s for s in [run_tok.eos_token, *meta.get("stop_strings", [])]
                                      if s != meta["eot_token"]]
    assert stops == list(dict.fromkeys(expected)) == ["<|im_end|>"]
    # the Go TEMPLATE renders a conversation exactly as the run's (Jinja) template does
    template = dict(entries)["TEMPLATE"]
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Who are you?"}]
    for msgs in (conv, conv[1:], conv[:3]):
        gen = msgs[-1]["role"] != "assistant"
        want = run_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert go_render(template, msgs) == want


def test_modelfile_of_real_templates(tmp_path):
    """Real tokenizers' templates: ChatML with a default system prompt (Qwen2.5, SmolLM: Ollama's
    SYSTEM carries it), Zephyr-style (TinyLlama); Llama 2's folds the system prompt into the first
    user turn, which has no per-message Go form: no TEMPLATE line, the GGUF's own is used."""
    from conftest import shared_assets
    from lorastudio.core import model as model_lib
    from lorastudio.core import modelfile, templates

    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And you?"}]
    for name, form in (("qwen2.5", "go"), ("smollm", "go"), ("tinyllama-chat", "go"), ("llama2-chat", "gguf")):
        tok = model_lib.load_tokenizer(str(shared_assets() / "tokenizers" / name))
        tpl = templates.resolve_template(tok, "auto")
        said = modelfile.write(tmp_path / f"Modelfile.{name}", "m.gguf", tok, tpl)
        entries = parse_modelfile((tmp_path / f"Modelfile.{name}").read_text())
        stops = [v[1] for n, v in entries if n == "PARAMETER" and v[0] == "stop"]
        assert said["template"] == form and stops == said["stops"] and tpl.eot(tok) == stops[0], name
        assert tok.eos_token in stops
        found = dict((n, v) for n, v in entries if n != "PARAMETER")
        if form == "gguf":
            assert "TEMPLATE" not in found
            continue
        for msgs in (conv, conv[1:], conv[:3], conv[1:3]):
            gen = msgs[-1]["role"] != "assistant"
            sent = msgs if msgs[0]["role"] == "system" or "SYSTEM" not in found else \
                [{"role": "system", "content": found["SYSTEM"]}] + msgs  # what Ollama does with SYSTEM
            assert go_render(found["TEMPLATE"], sent) == tpl.render(msgs, add_generation_prompt=gen, tokenizer=tok), name
    assert "Qwen" in parse_modelfile((tmp_path / "Modelfile.qwen2.5").read_text())[2][1]  # its default system prompt


def test_modelfile_parser_rejects_what_ollama_rejects():
    with pytest.raises(AssertionError):
        parse_modelfile('TEMPLATE """x"""\n')  # no FROM
    with pytest.raises(AssertionError):
        parse_modelfile("FROM ./m.gguf\nFROMAGE x\n")
    with pytest.raises(ValueError):
        parse_modelfile('FROM ./m.gguf\nTEMPLATE """never closed\n')
    assert parse_modelfile('from m.gguf\n# note\nparameter stop "<|end|>"\n') == [
        ("FROM", "m.gguf"), ("PARAMETER", ("stop", "<|end|>"))]


# ---------------------------------------------------------------- QLoRA, refusals, the missing extra

def test_qlora_run_exports_through_the_16bit_merge(qlora_run):
    qlora_run = copy_run(qlora_run, "qlora-gguf")
    out = export(qlora_run, "f16")
    report = json.loads((qlora_run / "gguf-f16" / "verification.json").read_text())
    merge_report = json.loads((qlora_run / "merged" / "verification.json").read_text())
    assert report["merged"] == str(qlora_run / "merged") and merge_report["method"] == "qlora"
    assert merge_report["dtype"] == "float32" and "vs_4bit_base_plus_adapter" in merge_report["verification"]
    assert report["passed"] is True, json.dumps(report["verification"], default=str)[:3000]
    assert "no merge yet" in out.stdout and "4-bit base + adapter" in out.stdout


def test_an_architecture_the_converter_lacks_is_refused_before_merging(demo_run, tmp_path):
    """A base whose config.json names an architecture missing from the converter's registry."""
    base = tmp_path / "opt-like"
    shutil.copytree(tiny.model_path(), base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "architectures": ["OPTForCausalLM"]}))
    run = runs.workspace.home() / "runs" / f"opt-like-{os.getpid()}"
    run.mkdir(parents=True)
    shutil.copytree(demo_run / "adapter", run / "adapter")
    text = (demo_run / "config.yaml").read_text()
    (run / "config.yaml").write_text(re.sub(r"name_or_path: .*", f"name_or_path: {base}", text, count=1))
    out = lorastudio("convert", str(run), "--gguf", "f16")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "OPTForCausalLM" in out.stderr and "registry" in out.stderr and "Traceback" not in out.stderr
    assert not (run / "merged").exists() and not (run / "gguf-f16").exists()  # refused before any work


def test_without_the_extra_the_message_says_how_to_install_it(demo_run, tmp_path):
    """llama_cpp made unimportable for one child (a package of that name that raises ImportError
    first on its path): the export stops with the install command, not a traceback."""
    shadow = tmp_path / "shadow" / "llama_cpp"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'llama_cpp'\")\n")
    env = {"PYTHONPATH": str(tmp_path / "shadow") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = copy_run(demo_run, "demo-noextra")  # its convert.log gets the refusal, not demo_run's
    out = lorastudio("convert", str(run), "--gguf", "f16", "--out", str(tmp_path / "g"), env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert '.[gguf]' in out.stderr and "pip install" in out.stderr and "llama-cpp-python" in out.stderr
    assert not (tmp_path / "g").exists()
    chat_out = lorastudio("chat", str(tmp_path / "none.gguf"), "--prompt", "hi", env=env)
    assert chat_out.returncode == 2 and "not found" in chat_out.stderr
