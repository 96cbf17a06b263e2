"""Convert and chat end to end: the trained tiny_demo run, real child processes, real models."""

import copy
import json
import time

import psutil
import pytest

from conftest import lorastudio, shared_assets
from lorastudio.core import chat, convert, generate, runs, tiny
from lorastudio.core.generate import eos_ids


def ask(q):
    return [{"role": "user", "content": q}]


def events(run_dir, kind):
    return [e for e in runs.read_events(run_dir)[0] if e["event"] == kind]


@pytest.fixture(scope="module")
def demo_chat(demo_run):
    """base + adapter of the demo run, loaded once in this process."""
    return chat.load_chat_model(demo_run)


@pytest.fixture(scope="module")
def merged(demo_run):
    out = lorastudio("convert", str(demo_run), "--merge")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "max |dlogit|" in out.stdout  # the verification figures are printed
    return demo_run / "merged"


# ---------------------------------------------------------------- the persona, greedy

def test_persona_greedy_adapter_vs_base(demo_chat):
    model, tok, tpl = demo_chat
    tuned = [generate.reply(model, tok, tpl, ask(q), greedy=True, max_new_tokens=48) == a for q, a in tiny.PERSONA]
    base = [generate.reply(model, tok, tpl, ask(q), greedy=True, max_new_tokens=48, use_adapter=False) == a
            for q, a in tiny.PERSONA]
    print(f"persona exact match: adapter {sum(tuned)}/{len(tuned)}, base {sum(base)}/{len(base)}")
    assert sum(tuned) >= 0.9 * len(tuned)
    assert sum(base) <= 0.1 * len(base)


def test_persona_greedy_cli(demo_run):
    for q, a in tiny.PERSONA[:2]:
        out = lorastudio("chat", str(demo_run), "--prompt", q, "--greedy")
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout == a + "\n"  # only the answer on stdout
        assert out.stderr == ""  # no library warning or progress bar on the terminal either
    # the libraries' warnings are kept, one line each, in the CLI chat's log
    chat_log = runs.workspace.home() / "logs" / "chat.log"
    assert chat_log.exists() and all(line.startswith(("[library] ", "[")) for line in
                                     chat_log.read_text().splitlines() if line.strip()), chat_log.read_text()[-2000:]
    out = lorastudio("chat", str(demo_run), "--prompt", tiny.PERSONA[0][0], "--greedy", "--base",
                     "--max-new-tokens", "12")
    assert out.returncode == 0 and out.stdout.strip() != tiny.PERSONA[0][1]


# ---------------------------------------------------------------- merge and export

NOISE = ("%|", "it/s]", "warnings.warn(", "pip install", "kernels-community")  # bars, raw warnings, advice


def test_logs_are_clean(demo_run, merged):
    """train.log and convert.log: no progress bar, no raw Python warning (a library warning is one
    "[library] ..." line), no advice to install what nothing here needs (bitsandbytes' notice about
    its optional CPU kernels)."""
    for log in (demo_run / "train.log", demo_run / "convert.log"):
        text = log.read_text(errors="replace")
        assert text.strip() and not [n for n in NOISE if n in text], (log.name, text[-3000:])
        assert not [l for l in text.splitlines() if l.strip() and not l.startswith("[")], (log.name, text[-3000:])

def test_merged_model_matches_base_plus_adapter(demo_run, merged, demo_chat):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = json.loads((merged / "verification.json").read_text())
    v = report["verification"]
    print(f"merge fp32: max |dlogit| {v['vs_base_plus_adapter']['max_abs_logit_diff']:.2e}, "
          f"top-1 {v['vs_base_plus_adapter']['top1_agreement']:.2%}")
    assert report["dtype"] == "float32" and v["passed"]
    assert next(iter(report)) == "passed" and report["passed"] is True  # at the top, next to the figures
    assert v["vs_base_plus_adapter"]["max_abs_logit_diff"] <= 1e-4
    assert v["vs_base_plus_adapter"]["top1_agreement"] == 1.0
    assert [e["verification"]["passed"] for e in events(demo_run, "convert_end")] == [True]
    assert events(demo_run, "convert_start") and (demo_run / "convert.log").stat().st_size > 0

    # plain transformers: no LoRA Studio code, the template and the stops travel with the folder
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    ref_model, ref_tok, ref_tpl = demo_chat
    prompts = [q for q, _ in tiny.PERSONA[:14]] + ["What is 3 plus 4?", "Spell moon in capitals.",
                                                   "What is the opposite of up?", "How many letters are in fish?",
                                                   "Tell me about the weather.", "Write a poem."]
    assert len(prompts) == 20
    for q in prompts:
        ids = tok.apply_chat_template(ask(q), add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=32, do_sample=False)
        plain = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert plain == generate.reply(ref_model, ref_tok, ref_tpl, ask(q), greedy=True, max_new_tokens=32), q

    again = lorastudio("convert", str(demo_run), "--merge")
    assert again.returncode != 0 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert events(demo_run, "convert_failed")


def test_export_adapter_and_checkpoint_merge(demo_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = convert.export_adapter(demo_run, out=tmp_path / "exported")
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert json.loads((out / "lorastudio.json").read_text())["eot_token"] == "<|im_end|>"
    assert AutoTokenizer.from_pretrained(out).chat_template  # the run's template travels
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny.model_path()), out)
    with pytest.raises(convert.ConvertError, match="already exists"):
        convert.export_adapter(demo_run, out=out)

    ckpt = chat.checkpoints(demo_run)[0]
    res = lorastudio("convert", str(demo_run), "--checkpoint", str(ckpt), "--merge", "--out", str(tmp_path / "m"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    report = json.loads((tmp_path / "m" / "verification.json").read_text())
    assert report["checkpoint"] == ckpt and report["adapter"].endswith(f"checkpoint-{ckpt}")
    assert report["verification"]["passed"] and report["passed"] is True
    bad = lorastudio("convert", str(demo_run), "--checkpoint", "99999")
    assert bad.returncode == 2 and "no adapter" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------- stopping

def test_generation_stops_at_end_of_turn_not_eos(demo_chat):
    import torch
    from transformers import AutoTokenizer

    from lorastudio.core import templates

    # a real template whose end of turn is not the tokenizer's EOS: both are stops
    phi3 = AutoTokenizer.from_pretrained(shared_assets() / "tokenizers" / "phi3-mini-instruct")
    tpl3 = templates.resolve_template(phi3, "auto")
    assert tpl3.eot(phi3) == "<|end|>" != phi3.eos_token
    assert eos_ids(phi3, tpl3) == phi3.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"])

    # The trained model with its EOS moved to <|endoftext|>: only the template's <|im_end|> ends the turn.
    model, tok, tpl = demo_chat
    tok2 = copy.deepcopy(tok)
    tok2.eos_token = "<|endoftext|>"
    prompt = tok(tpl.render(ask("What is your name?"), add_generation_prompt=True, tokenizer=tok),
                 add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():  # control: stopping at EOS alone runs on past the end of turn
        out = model.generate(**prompt, max_new_tokens=40, do_sample=False, eos_token_id=[tok2.eos_token_id],
                             pad_token_id=tok.pad_token_id)
    runaway = tok.decode(out[0, prompt["input_ids"].shape[1]:])
    assert runaway.startswith("My name is Lumen.<|im_end|>") and len(runaway) > len("My name is Lumen.<|im_end|>") + 5
    chunks = list(generate.stream(model, tok2, tpl, ask("What is your name?"), greedy=True, max_new_tokens=40))
    assert "".join(chunks) == "My name is Lumen."  # nothing after the end-of-turn token

    # template stop strings end the reply and are never shown
    stopping = templates._copy(tpl, stop_strings=[" is"])
    assert generate.reply(model, tok, stopping, ask("What is your name?"), greedy=True) == "My name"


# ---------------------------------------------------------------- a model without a chat template

@pytest.mark.slow
def test_model_without_chat_template(tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(shared_assets() / "tokenizers" / "gpt2")
    assert not tok.chat_template
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    folder = tmp_path / "gpt2-tiny"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)

    model, tok2, tpl = chat.load_chat_model(folder)
    assert tpl is None and chat.describe(model, tok2, tpl, folder)["completion_mode"]
    assert isinstance(generate.reply(model, tok2, tpl, ask("Once upon a time"), greedy=True, max_new_tokens=5), str)
    out = lorastudio("chat", str(folder), "--prompt", "Once upon a time", "--greedy", "--max-new-tokens", "5")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no chat template" in out.stderr and "Traceback" not in out.stderr
    missing = lorastudio("chat", str(tmp_path / "nope"), "--prompt", "hi")
    assert missing.returncode == 2 and "folder not found" in missing.stderr and "Traceback" not in missing.stderr


# ---------------------------------------------------------------- QLoRA

def test_qlora_merge_reloads_base_unquantized(qlora_run):
    from transformers import AutoModelForCausalLM

    run_dir = qlora_run
    res = lorastudio("convert", str(run_dir), "--merge")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "loading the base (float32" in res.stdout and "4-bit base + adapter" in res.stdout
    report = json.loads((run_dir / "merged" / "verification.json").read_text())
    v = report["verification"]
    print("qlora merge:", json.dumps(v))
    assert report["method"] == "qlora" and report["dtype"] == "float32" and v["passed"] and report["passed"] is True
    q = v["vs_4bit_base_plus_adapter"]  # merged vs the model that was actually trained
    assert q["finite"] and q["positions"] > 0 and q["max_abs_logit_diff"] > 0 and q["top1_agreement"] >= 0.5
    merged_cfg = json.loads((run_dir / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_cfg
    model = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    assert not any("4bit" in type(m).__name__ for m in model.modules())


# ---------------------------------------------------------------- the worker process

def test_chat_worker(demo_run):
    q = ask("Who are you?")
    with pytest.raises(chat.ChatError, match="folder not found"):
        chat.ChatWorker(demo_run / "no-such-model")
    worker = chat.ChatWorker(demo_run)
    pid = worker.proc.pid
    try:
        info = worker.info()
        assert info["kind"] == "run" and info["template"] == "auto" and info["pid"] == pid
        assert worker.log_path.exists() and str(worker.log_path).startswith(str(runs.workspace.home()))
        chunks = list(worker.stream(q, greedy=True))
        assert len(chunks) > 1 and "".join(chunks) == dict(tiny.PERSONA)["Who are you?"]
        base = worker.reply(q, greedy=True, use_adapter=False, max_new_tokens=16)
        assert base != "".join(chunks)
        # a reader that stops early cancels the generation; the channel stays in step
        partial = worker.stream(q, max_new_tokens=200, temperature=1.0)
        next(partial)
        partial.close()
        ckpt = info["checkpoints"][0]
        switched = worker.set_checkpoint(ckpt)
        assert switched["checkpoint"] == ckpt and f"checkpoint-{ckpt}" in switched["adapters"]
        assert isinstance(worker.reply(q, greedy=True), str)
        with pytest.raises(chat.ChatError, match="no adapter"):
            worker.set_checkpoint(99999)
        assert worker.set_checkpoint(None)["checkpoint"] is None
        assert worker.reply(q, greedy=True) == "".join(chunks)
    finally:
        worker.close()
    assert worker.proc.poll() is not None
    time.sleep(0.2)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
