"""The training child end to end: real subprocesses, the real tiny model, the run-dir contract."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, events, lorastudio, shared_assets, wait_for
from lorastudio.core import config as config_lib
from lorastudio.core import runs

# every test here starts training children or a server (the quick suite leaves them out)
pytestmark = pytest.mark.slow


def step_losses(run_dir):
    return {e["step"]: e["loss"] for e in events(run_dir, "step")}


# ---------------------------------------------------------------- the shared smoke run

def test_run_dir_contract(smoke_run):
    info = json.loads((smoke_run / "run.json").read_text())
    assert info["status"] == "done" and info["exit_code"] == 0
    assert info["pid"] and info["pid_start_time"]
    assert info["versions"]["torch"] and info["versions"]["transformers"] and info["versions"]["peft"]
    assert len(info["dataset_hash"]) == 64
    assert info["model_revision"].startswith("local:")
    assert info["data"]["reports"][0]["rows_used"] == 210
    # config.yaml holds every resolved value and reproduces the run with the CLI
    cfg = yaml.safe_load((smoke_run / "config.yaml").read_text())
    assert cfg["training"]["device"] == "cpu" and cfg["model"]["dtype"] == "float32"
    assert cfg["training"]["gradient_checkpointing"] is False and cfg["training"]["optimizer"] == "adamw_torch"
    assert (smoke_run / "config.yaml").read_text().startswith("# lorastudio train ")
    config_lib.load(smoke_run / "config.yaml")  # valid as a config for `lorastudio train`
    # metrics.jsonl: every event type, steps in order, totals known up front
    kinds = {e["event"] for e in events(smoke_run)}
    assert {"data", "start", "step", "eval", "sample", "checkpoint", "end"} <= kinds
    steps = events(smoke_run, "step")
    assert [e["step"] for e in steps] == list(range(1, 31))
    assert events(smoke_run, "start")[0]["total_steps"] == 30
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mem_mb", "epoch", "eta_s"):
        assert key in steps[-1], key
    assert (smoke_run / "train.log").stat().st_size > 0
    # save_total_limit: 2 keeps the last two checkpoints
    assert sorted(p.name for p in smoke_run.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]


def test_adapter_loads_with_plain_peft(smoke_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorastudio.core import tiny

    base = AutoModelForCausalLM.from_pretrained(tiny.model_path())
    model = PeftModel.from_pretrained(base, smoke_run / "adapter")
    tok = AutoTokenizer.from_pretrained(smoke_run / "adapter")
    ids = tok("hello", return_tensors="pt")
    with torch.no_grad():
        tuned = model(**ids).logits
        with model.disable_adapter():
            plain = model(**ids).logits
    assert not torch.allclose(tuned, plain)  # the adapter really changes the model
    assert (smoke_run / "adapter" / "adapter_model.safetensors").exists()
    assert tok.chat_template  # the training template travels with the adapter


def test_golden_losses_with_fixed_seed(smoke_run):
    """Same seed, same data, same versions -> the same loss curve (to float noise)."""
    golden = {1: 7.1699, 10: 5.2419, 20: 5.1993, 30: 4.4586}
    got = step_losses(smoke_run)
    for step, loss in golden.items():
        assert got[step] == pytest.approx(loss, rel=1e-2), (step, got[step])
    assert got[30] < got[1]


def test_cli_runs_lists_the_run(smoke_run):
    out = lorastudio("runs", "--json", env={"LORASTUDIO_HOME": os.environ["LORASTUDIO_HOME"]})
    assert out.returncode == 0


# ---------------------------------------------------------------- stop and resume

def test_sigterm_stops_with_adapter_then_resume_continues(tmp_path):
    run_dir = tmp_path / "stoppable"
    # slow enough that SIGTERM lands mid-training
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorastudio.cli", "train", "presets/tiny_smoke.yaml", "--run-dir", str(run_dir), "--detach",
         "--set", "training.max_steps=400", "--set", "training.save_steps=5", "--set", "training.sample_every=0",
         "--set", "data.eval_split=0"], cwd=ROOT)
    assert proc.wait(60) == 0
    assert wait_for(lambda: len(events(run_dir, "step")) >= 7), (run_dir / "train.log").read_text()[-2000:]
    info = runs.read_json(run_dir)
    os.killpg(info["pgid"], signal.SIGTERM)
    assert wait_for(lambda: runs.read_json(run_dir).get("status") in ("stopped", "failed"), timeout=60)
    info = runs.read_json(run_dir)
    assert info["status"] == "stopped" and info["exit_code"] == 3, info
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    stop_step = events(run_dir, "stopped")[-1]["step"]
    assert (run_dir / f"checkpoint-{stop_step}").is_dir()  # saved at the step it stopped

    # resume: continues from that checkpoint, not from step 0
    out = lorastudio("resume", str(run_dir), "--detach")
    assert out.returncode == 0, out.stderr
    assert wait_for(lambda: any(e["step"] > stop_step for e in events(run_dir, "step")), timeout=120)
    resume_ev = events(run_dir, "resume")[-1]
    assert resume_ev["step"] == stop_step
    starts = events(run_dir, "start")
    assert starts[-1]["step"] == stop_step and starts[-1]["total_steps"] == 400
    assert runs.stop(run_dir, grace=30) == "stopped"


def test_stop_before_training_and_dead_child_is_failed(tmp_path):
    """A killed child reads as failed (pid + start time), with the last log lines."""
    run_dir = tmp_path / "killed"
    out = lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(run_dir), "--detach",
                     "--set", "training.max_steps=2000", "--set", "training.sample_every=0")
    assert out.returncode == 0
    assert wait_for(lambda: len(events(run_dir, "step")) >= 2)
    os.killpg(runs.read_json(run_dir)["pgid"], signal.SIGKILL)
    assert wait_for(lambda: runs.status(run_dir).get("status") == "failed", timeout=30)
    info = runs.status(run_dir)
    assert "died" in info["error"] and info["log_tail"]


# ---------------------------------------------------------------- other methods and bad input

def test_qlora_nf4_on_cpu(qlora_run):
    run_dir = qlora_run
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["quantization"] == {"bits": 4, "quant_type": "nf4", "double_quant": True, "fp32_upcast": False}
    log = (run_dir / "train.log").read_text()
    assert "(qlora, float32, cpu)" in log
    assert runs.read_json(run_dir)["params"]["quantized_linear"] == 4 * 7  # every projection is 4-bit
    assert len(events(run_dir, "step")) == 4
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


def test_full_finetune_writes_model(tmp_path):
    run_dir = tmp_path / "full"
    out = lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(run_dir), "--set", "method=full",
                     "--set", "training.max_steps=3", "--set", "training.sample_every=0", "--set", "data.eval_split=0",
                     "--set", "training.learning_rate=1e-4")
    assert out.returncode == 0, out.stdout[-3000:]
    assert (run_dir / "model" / "model.safetensors").exists()


def test_bad_config_exit_2_names_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rate: -1\n  micro_batch: 4\n")
    out = lorastudio("train", str(bad), "--run-dir", str(tmp_path / "r"))
    assert out.returncode == 2
    assert "training.learning_rate" in out.stderr and "training.micro_batch: unknown key" in out.stderr
    assert "Traceback" not in out.stderr


def test_paged_optimizer_on_cpu_clear_message(tmp_path):
    out = lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(tmp_path / "r"),
                     "--set", "method=qlora", "--set", "training.optimizer=paged_adamw_32bit")
    assert out.returncode == 2 and "needs CUDA" in out.stderr


def test_bad_data_fails_with_exit_2_and_message(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("{not json}\n")
    out = lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(tmp_path / "r"),
                     "--set", f"data.sources=[{{path: {data}}}]")
    assert out.returncode == 2
    info = runs.read_json(tmp_path / "r")
    assert info["status"] == "failed" and "empty.jsonl" in info["error"]
    assert events(tmp_path / "r", "failed")


def test_missing_model_folder(tmp_path):
    out = lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(tmp_path / "r"),
                     "--set", f"model.name_or_path={tmp_path / 'nope'}")
    assert out.returncode == 2
    assert "folder not found" in runs.read_json(tmp_path / "r")["error"]


def test_tiny_demo_preset_learns(demo_run):
    """Acceptance: the demo preset trains on CPU, loss falls >= 50%, adapter loads with plain PEFT."""
    steps = events(demo_run, "step")
    first = sum(e["loss"] for e in steps[:3]) / 3
    last = sum(e["loss"] for e in steps[-3:]) / 3
    assert last <= 0.5 * first, (first, last)
    assert runs.read_json(demo_run)["status"] == "done"
    samples = [e for e in events(demo_run, "sample") if e["prompt"] == "What is your name?"]
    assert samples[-1]["reply"] == "My name is Lumen."


def _tiny_model_with_tokenizer(tok_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         tie_word_embeddings=False))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_named_template_adds_missing_tokens_and_trains_their_rows(tmp_path):
    """gpt2 has no <|im_start|>/<|im_end|>: chatml adds them, resizes embeddings, trains the new
    rows (PEFT trainable_token_indices) and saves them with the adapter."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = _tiny_model_with_tokenizer(shared_assets() / "tokenizers" / "gpt2", tmp_path / "gpt2-tiny")
    run_dir = tmp_path / "run"
    out = lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(run_dir),
                     "--set", f"model.name_or_path={model_dir}", "--set", "template.name=chatml",
                     "--set", "training.max_steps=3", "--set", "training.sample_every=0", "--set", "data.eval_split=0")
    assert out.returncode == 0, (run_dir / "train.log").read_text()[-3000:]
    info = runs.read_json(run_dir)
    assert info["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    token_keys = [k for k in weights if "trainable_tokens" in k]
    assert any("embed_tokens" in k for k in token_keys) and any("lm_head" in k for k in token_keys), token_keys
    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    assert tok.convert_tokens_to_ids("<|im_end|>") == 50258
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    with torch.no_grad():
        emb = model.get_input_embeddings()(torch.tensor([[50257, 50258]]))
    assert emb.shape == (1, 2, 32)


def test_dora_rslora_neftune_and_mixture(tmp_path):
    """Less common knobs reach PEFT/Trainer; two sources mix by ratio in one run."""
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"instruction": f"Echo {i}", "output": f"{i}"}) + "\n" for i in range(40)))
    run_dir = tmp_path / "run"
    out = lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(run_dir),
                     "--set", "lora.use_dora=true", "--set", "lora.use_rslora=true",
                     "--set", "training.neftune_alpha=5", "--set", "training.max_steps=3",
                     "--set", "training.sample_every=0", "--set", "data.eval_split=0",
                     "--set", f"data.sources=[{{path: 'builtin:sample', ratio: 0.5}}, {{path: '{extra}', ratio: 2}}]")
    assert out.returncode == 0, (run_dir / "train.log").read_text()[-3000:]
    info = runs.read_json(run_dir)
    reports = info["data"]["reports"]
    assert [r["format"] for r in reports] == ["openai", "alpaca"]
    assert info["data"]["tokens"]["samples"] == 105 + 80  # round(0.5 * 210) + 2 * 40
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["use_rslora"] is True


def test_cli_presets_commands(tmp_path):
    out = lorastudio("list-presets")
    assert out.returncode == 0 and "tiny_demo" in out.stdout and "tiny_smoke" in out.stdout
    out = lorastudio("copy-preset", "tiny_demo", str(tmp_path))
    assert out.returncode == 0 and (tmp_path / "tiny_demo.yaml").exists()
    assert lorastudio("copy-preset", "tiny_demo", str(tmp_path)).returncode != 0  # never overwrites
    assert "no preset" in lorastudio("copy-preset", "nope", str(tmp_path)).stderr
    # a preset name works where a file is expected
    out = lorastudio("preview", "tiny_smoke", "-n", "1", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)[0]["trained_spans"]


def test_cli_runs_and_stop_report_status(smoke_run, tmp_path):
    out = lorastudio("stop", str(smoke_run))
    assert out.returncode == 0 and out.stdout.strip() == "done"  # nothing to stop
    assert "not a run directory" in lorastudio("stop", str(tmp_path)).stderr


def test_qlora_8bit_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    run_dir = tmp_path / "q8"
    out = lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(run_dir), "--set", "method=qlora",
                     "--set", "quantization.bits=8", "--set", "training.max_steps=2", "--set", "training.sample_every=0",
                     "--set", "data.eval_split=0")
    assert out.returncode == 0, (run_dir / "train.log").read_text()[-3000:]
    assert runs.read_json(run_dir)["params"]["quantized_linear"] == 4 * 7


def test_early_stopping_keeps_the_best_checkpoint(tmp_path):
    """lr so high that eval loss gets worse: early stopping ends the run and keeps the best."""
    run_dir = tmp_path / "early"
    out = lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(run_dir), "--set", "training.max_steps=200",
                     "--set", "training.learning_rate=0.3", "--set", "training.lr_scheduler=constant",
                     "--set", "training.eval_steps=4", "--set", "training.save_steps=4",
                     "--set", "training.save_total_limit=1", "--set", "training.early_stopping_patience=2",
                     "--set", "training.sample_every=0", "--set", "data.eval_split=0.2")
    assert out.returncode == 0, (run_dir / "train.log").read_text()[-3000:]
    stop = events(run_dir, "early_stop")
    assert stop and stop[0]["step"] < 200
    evals = {e["step"]: e["eval_loss"] for e in events(run_dir, "eval")}
    best_step = min(evals, key=evals.get)
    info = runs.read_json(run_dir)
    assert info["best_checkpoint"] == f"checkpoint-{best_step}"
    assert info["best_eval_loss"] == pytest.approx(evals[best_step])
    assert (run_dir / f"checkpoint-{best_step}").is_dir()  # kept despite save_total_limit=1


def test_early_stopping_config_errors():
    from lorastudio.core import config as C

    with pytest.raises(C.ConfigError, match="early_stopping_patience: needs an eval split"):
        C.from_dict({"training": {"early_stopping_patience": 2}, "data": {"eval_split": 0}})
    with pytest.raises(C.ConfigError, match="training.save_steps: must be a multiple"):
        C.from_dict({"training": {"early_stopping_patience": 2, "eval_steps": 4, "save_steps": 6},
                     "data": {"eval_split": 0.1}})
