"""Preference training (issue 20): the stage and preference config, preference rows detected and
skipped by name, `preview --json` of both answers from the labelling function, and on the tiny
model DPO and KTO runs that continue a short SFT run (presets/tiny_dpo.yaml, tiny_kto.yaml):
the reward margin and the chosen answers' log-probability over the rejected ones rise, greedy
answers match the chosen ones more often than the parent's, and a resumed run repeats the
uninterrupted run's losses."""

import json
import shutil

import pytest

from conftest import ROOT, _workspace_run, events, lorastudio, wait_for
from lorastudio.core import config as C
from lorastudio.core import preference_data as P
from lorastudio.core import resolve as R
from lorastudio.core.data_files import DataError

ROWS = [
    {"prompt": "What is your name?", "chosen": "My name is Lumen.", "rejected": "I like teal."},
    {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello!"},
     "rejected": {"from": "gpt", "value": "Go away."}},
    {"chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}]},
    {"instruction": "Name a colour", "chosen": "Teal.", "rejected": "Seven."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "chosen": [{"role": "assistant", "content": "Hi."}], "rejected": [{"role": "assistant", "content": "No."}]},
    {"prompt": "x", "chosen": "", "rejected": "y"},
    {"prompt": "x", "chosen": 5, "rejected": "y"},
    {"prompt": "a", "chosen": "b", "rejected": "b"},
    {"prompt": [{"role": "robot", "content": "a"}], "chosen": "b", "rejected": "c"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_stage_and_preference_config(tmp_path):
    assert C.RunConfig().stage == "sft"
    cfg = C.load(ROOT / "presets" / "tiny_smoke.yaml", ["stage=dpo", "preference.beta=0.3"])
    assert (cfg.stage, cfg.preference.beta, cfg.preference.loss_type) == ("dpo", 0.3, "auto")
    for data, says in [({"preference": {"bogus": 1}}, "preference.bogus: unknown key"),
                       ({"stage": "ppo"}, "stage: Input should be"),
                       ({"stage": "kto", "training": {"micro_batch_size": 1}}, "training.micro_batch_size: KTO needs"),
                       ({"stage": "dpo", "preference": {"loss_type": "kto"}}, "preference.loss_type: 'kto' is not"),
                       ({"stage": "dpo", "template": {"packing": True}}, "template.packing: not with stage dpo"),
                       ({"stage": "simpo", "preference": {"reference_free": True}}, "preference.reference_free"),
                       ({"method": "full", "model": {"adapter_from": "x"}}, "model.adapter_from: continues")]:
        with pytest.raises(C.ConfigError, match=says.replace("(", r"\(")):
            C.from_dict(data)
    # resolved values land in config.yaml: the loss, the last answer trained, no fused path
    r = R.resolve(C.from_dict({"stage": "dpo", "preference": {"loss_type": "sigmoid+sft"}}), R.assumed("cpu"))
    text = C.to_yaml(r)
    assert text.startswith("stage: dpo\n") and "loss_type: sigmoid+sft" in text and "train_on: last" in text
    assert C.from_dict(C.yaml.safe_load(text)).stage == "dpo"
    assert R.resolve(C.from_dict({"stage": "kto"}), R.assumed("cpu")).preference.loss_type == "kto"
    with pytest.raises(C.ConfigError, match="model.adapter_from: no LoRA adapter"):
        R.resolve(C.from_dict({"stage": "dpo", "model": {"adapter_from": str(tmp_path)}}), R.assumed("cpu"))


def test_preference_rows_detected_normalised_and_skipped_by_name(tmp_path):
    rows, report = P.load_file(_jsonl(tmp_path / "p.jsonl", ROWS))
    assert report.format == "preference" and report.rows_used == 5 and report.rows_skipped == 4
    for pair in rows:  # both sides the same conversation up to their answers
        assert pair["chosen"]["messages"][:-1] == pair["rejected"]["messages"][:-1]
        assert pair["chosen"]["messages"][-1]["role"] == "assistant"
    assert rows[1]["chosen"]["messages"] == [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello!"}]
    assert rows[4]["chosen"]["messages"][0] == {"role": "system", "content": "Be brief."}
    reasons = [s.reason for s in report.skipped]
    assert reasons[0].startswith("p.jsonl, line 6: field 'chosen': empty answer")
    assert reasons[1].startswith("p.jsonl, line 7: field 'chosen': expected the answer as a string, got an int")
    assert "line 8: fields 'chosen' and 'rejected': the same answer" in reasons[2]
    assert "line 9" in reasons[3] and "unknown role 'robot'" in reasons[3]
    # KTO: labelled rows, and pairs unpaired (chosen true, rejected false)
    kto = [{"prompt": "Hi", "completion": "Hello!", "label": True},
           {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bye."}], "label": False},
           {"prompt": "Hi", "completion": "Yo", "label": "yes"}]
    rows, report = P.load_file(_jsonl(tmp_path / "k.jsonl", kto), want="kto")
    assert [r["label"] for r in rows] == [True, False] and report.format == "kto"
    assert "line 3: field 'label': expected true or false, got a string" in report.skipped[0].reason
    rows, _ = P.load_file(_jsonl(tmp_path / "p2.jsonl", ROWS[:2]), want="kto")
    assert [r["label"] for r in rows] == [True, False, True, False]
    with pytest.raises(DataError, match="KTO data: use stage: kto"):
        P.load_file(tmp_path / "k.jsonl")
    from lorastudio.core import data

    with pytest.raises(DataError, match="preference data.*stage: dpo"):  # an SFT run points to the stage
        data.load_file(tmp_path / "p.jsonl")


def test_preview_json_shows_both_answers_labelled_as_training_labels_them(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", ROWS[:4])
    out = lorastudio("preview", "--model", "builtin:tiny", "--data", str(path), "-n", "4", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert len(got) == 4
    from lorastudio.core import labels, model, templates

    tok = model.load_tokenizer("builtin:tiny")
    tok, tpl, _, _ = templates.with_template(tok, "auto", train_on="last")
    for sample, row in zip(got, P.load_file(path)[0]):
        for side in ("chosen", "rejected"):
            s = sample[side]
            answer = row[side]["messages"][-1]["content"]
            assert [s["text"][a:b] for a, b in s["trained_spans"]] == [answer + "<|im_end|>"]
            enc = labels.encode_example(tok, tpl, row[side])  # the labelling function training uses
            assert enc.text == s["text"] and labels.trained_spans_chars(enc) == [tuple(x) for x in s["trained_spans"]]
            trained = tok.decode([t for t, m in zip(enc.input_ids, enc.mask) if m])
            assert trained == answer + "<|im_end|>"
    out = lorastudio("preview", "--model", "builtin:tiny", "--data", "builtin:kto", "-n", "2", "--json")
    assert out.returncode == 0, out.stderr
    assert [set(s) >= {"label", "completion"} for s in json.loads(out.stdout)] == [True, True]


# ---------------------------------------------------------------- training on the tiny model

def _greedy(run_dir) -> list[str]:
    """Greedy answers to the sample questions through the product's chat path."""
    from lorastudio.core import chat, generate, tiny

    model, tok, tpl = chat.load_chat_model(run_dir, device="cpu")
    return [generate.reply(model, tok, tpl, [{"role": "user", "content": q}], greedy=True, max_new_tokens=32)
            for q, _ in tiny.PERSONA + tiny.FACTS]


def _greedy_hits(run_dir) -> int:
    from lorastudio.core import tiny

    return sum(g == a for g, (_, a) in zip(_greedy(run_dir), tiny.PERSONA + tiny.FACTS))


def _chosen_over_rejected(run_dir) -> float:
    """Mean over builtin:preference of log p(chosen answer) - log p(rejected answer)."""
    import torch

    from lorastudio.core import chat, tiny

    model, tok, tpl = chat.load_chat_model(run_dir, device="cpu")
    _, last, _, _ = __import__("lorastudio.core.templates", fromlist=["x"]).with_template(tok, "auto", train_on="last")
    pairs, _ = P.load_file(tiny.resolve_data("builtin:preference"))
    diffs = []
    with torch.no_grad():
        for pair in pairs:
            side = {}
            for k, enc in P.encode(tok, last, pair, None).items():
                ids = torch.tensor([enc.input_ids])
                logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
                side[k] = float((logp * torch.tensor(enc.mask[1:])).sum())
            diffs.append(side["chosen"] - side["rejected"])
    return sum(diffs) / len(diffs)


@pytest.fixture(scope="module")
def sft_parent(tmp_path_factory):
    """The presets' parent: 3 of the demo's 8 epochs (the sample's answers, mixed up)."""
    run_dir = _workspace_run("pref-sft")  # in the workspace: the web app may read it (the Train tab test)
    lorastudio("train", "presets/tiny_demo.yaml", "--run-dir", str(run_dir), "--set", "training.epochs=3",
               "--set", "training.sample_every=0", "--set", "data.eval_split=0", check=True)
    return run_dir


@pytest.fixture(scope="module")
def dpo_run(sft_parent):
    run_dir = _workspace_run("pref-dpo")
    lorastudio("train", "presets/tiny_dpo.yaml", "--run-dir", str(run_dir), "--set",
               f"model.adapter_from={sft_parent}", check=True)
    return run_dir


@pytest.mark.slow
def test_dpo_raises_the_margin_and_the_chosen_answers_over_its_sft_parent(sft_parent, dpo_run):
    steps = events(dpo_run, "step")
    assert len(steps) == 48 and all("rewards/margins" in e and "rewards/accuracies" in e for e in steps)
    first, last = steps[:8], steps[-8:]
    mean = lambda es, k: sum(e[k] for e in es) / len(es)  # noqa: E731
    assert mean(last, "rewards/margins") > mean(first, "rewards/margins") + 1 and mean(last, "rewards/margins") > 0
    assert mean(last, "rewards/accuracies") >= 0.9
    assert mean(last, "loss") < mean(first, "loss")
    cfg = C.load(dpo_run / "config.yaml")
    assert (cfg.stage, cfg.preference.loss_type, cfg.template.train_on) == ("dpo", "sigmoid+sft", "last")
    assert cfg.model.adapter_from == str(sft_parent / "adapter")
    info = json.loads((dpo_run / "run.json").read_text())
    assert info["stage"]["trainer"] == "trl.DPOTrainer" and info["status"] == "done"
    log = (dpo_run / "train.log").read_text()
    assert "reference: the base + the frozen parent adapter" in log
    assert not (dpo_run / "adapter" / "ref").exists()  # the frozen copy is no part of the result
    assert _chosen_over_rejected(dpo_run) > _chosen_over_rejected(sft_parent) + 5
    parent, tuned = _greedy_hits(sft_parent), _greedy_hits(dpo_run)
    print(f"greedy exact answers of 30: parent {parent}, dpo {tuned}")
    assert tuned >= parent + 5, (parent, tuned)
    # the Chat tab's side by side offers the parent SFT run as its left side (two chat workers
    # answering it cost ~30 s on a busy 2-core machine: the streaming path is the checkpoint
    # compare's, tested in test_convert_chat.py)
    from lorastudio.webui import tab_chat

    assert tab_chat.parent_of(str(dpo_run)) == (str(sft_parent), "final")
    assert tab_chat.parent_of(str(sft_parent)) is None
    *_, (left, right) = tab_chat.compare("Hi", str(sft_parent), "final", "", 0.7, 0.9, 8, True, left_side="parent")
    assert "continues no other run" in right[-1]["content"]


@pytest.mark.slow
def test_kto_from_the_same_parent_prefers_the_good_answers(sft_parent):
    run_dir = _workspace_run("pref-kto")
    lorastudio("train", "presets/tiny_kto.yaml", "--run-dir", str(run_dir), "--set",
               f"model.adapter_from={sft_parent}", check=True)
    steps = events(run_dir, "step")
    assert len(steps) == 92 and all("kl" in e for e in steps)  # rewards: of the labels a micro-batch holds
    assert sum("rewards/chosen" in e and "rewards/rejected" in e for e in steps) > 80
    margins = [e["rewards/margins"] for e in steps if "rewards/margins" in e]
    assert sum(margins[-8:]) / 8 > sum(margins[:8]) / 8 and sum(margins[-8:]) > 0
    assert json.loads((run_dir / "run.json").read_text())["stage"]["trainer"] == "trl.KTOTrainer"
    parent, tuned = _greedy_hits(sft_parent), _greedy_hits(run_dir)
    print(f"greedy exact answers of 30: parent {parent}, kto {tuned}")
    assert tuned >= parent + 2, (parent, tuned)


@pytest.mark.slow
def test_orpo_and_simpo_run_from_trl_experimental(tmp_path):
    """No reference model: a fresh adapter on the base, two steps each, their rewards logged."""
    for stage, trainer in (("orpo", "trl.experimental.orpo.ORPOTrainer"), ("simpo", "trl.experimental.cpo.CPOTrainer")):
        run_dir = tmp_path / stage
        lorastudio("train", "presets/tiny_dpo.yaml", "--run-dir", str(run_dir), "--set", f"stage={stage}",
                   "--set", "model.adapter_from=null", "--set", "preference.loss_type=auto", "--set",
                   "training.max_steps=2", "--set", "training.sample_prompts=[]", check=True)
        steps = events(run_dir, "step")
        assert len(steps) == 2 and all("rewards/margins" in e and "rewards/accuracies" in e for e in steps)
        assert steps[-1]["tokens_seen"] > 0 and steps[-1]["tokens_per_s"] > 0
        info = json.loads((run_dir / "run.json").read_text())
        assert info["stage"]["trainer"].startswith(trainer) and info["stage"]["experimental"]
        assert "trl.experimental: may change" in (run_dir / "train.log").read_text()
        assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


def test_estimate_counts_both_answers_of_a_pair_and_the_full_reference():
    from lorastudio.core import estimate as E

    base = {"model": {"name_or_path": "Qwen/Qwen2.5-7B-Instruct"}, "method": "qlora",
            "template": {"cutoff_len": 1024}, "training": {"micro_batch_size": 2, "gradient_checkpointing": True}}
    sft, dpo, kto = (E.estimate(C.from_dict({**base, "stage": s}), detect=False) for s in ("sft", "dpo", "kto"))
    assert dpo["tokens_per_step"] == 2 * sft["tokens_per_step"] == 2 * kto["tokens_per_step"]
    assert dpo["components"]["activations"] == pytest.approx(2 * sft["components"]["activations"])
    assert dpo["total_gib"] > sft["total_gib"] and "reference_model" not in dpo["components"]  # adapter disabled
    full = E.estimate(C.from_dict({"stage": "dpo", "method": "full",
                                   "model": {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}}), detect=False)
    assert full["components"]["reference_model"] == full["components"]["weights"]
    # the 7B QLoRA DPO preset: the estimator's figure in its header
    path = ROOT / "presets" / "qwen2_5_7b_qlora_dpo.yaml"
    est = E.estimate(C.load(path), detect=False)
    assert f"# estimated peak VRAM: {est['total_rounded']} GiB" in path.read_text()


@pytest.mark.slow
def test_train_tab_starts_a_dpo_run_and_shows_its_rewards(sft_parent):
    """The Train tab's /start path (the form over the tiny_dpo preset, the Stage and Continue-from
    fields) and its live view: the rewards curves next to the loss."""
    from lorastudio.core import runs
    from lorastudio.webui import train_form, train_view
    from lorastudio.webui.tab_train import start_from_dict

    form = train_form.preset_form("tiny_dpo")
    assert (form["stage"], form["pref_loss_type"], form["adapter_from"]) == ("dpo", "sigmoid+sft", "tiny-sft")
    form = {**form, "adapter_from": str(sft_parent), "max_steps": 6, "sample_prompts": "", "pref_beta": 0.2}
    run_dir, md, cmd = start_from_dict("tiny_dpo", form)
    assert run_dir, md
    assert wait_for(lambda: runs.read_json(run_dir).get("status") in ("done", "failed"), timeout=180)
    cfg = C.load(f"{run_dir}/config.yaml")
    assert (cfg.stage, cfg.preference.beta, cfg.model.adapter_from) == ("dpo", 0.2, str(sft_parent / "adapter"))
    v = train_view.run_api(run_dir)
    assert v["status"] == "done", v.get("error")
    assert [s for s, _ in v["rewards"]["rewards/margins"]] == list(range(1, 7))
    frame = train_view.reward_frame(v)
    assert set(frame["series"]) == {"margins", "accuracies", "chosen", "rejected"} and len(frame) == 24
    assert train_view.run_view("")["rewards"] == {}
    with pytest.raises(Exception, match="not|outside|allowed"):  # a folder outside the allowed ones
        train_form.build_config("tiny_dpo", {**form, "adapter_from": "/etc/ssl"})


@pytest.mark.slow
def test_dpo_stopped_then_resumed_repeats_the_uninterrupted_losses(sft_parent, dpo_run):
    """Stop (SIGTERM) between steps: status stopped, exit 3, adapter/ without the reference copy, a
    checkpoint at the stop step; resumed, the later steps give the uninterrupted run's losses and
    rewards. (A greedy sample after every step only slows the run so the signal lands mid-way.)"""
    import os
    import signal

    from lorastudio.core import runs

    run_dir = _workspace_run("pref-stop")
    out = lorastudio("train", "presets/tiny_dpo.yaml", "--run-dir", str(run_dir), "--detach", "--set",
                     f"model.adapter_from={sft_parent}", "--set", "training.sample_every=1")
    assert out.returncode == 0, out.stderr
    assert wait_for(lambda: len(events(run_dir, "step")) >= 4, timeout=120), (run_dir / "train.log").read_text()[-2000:]
    os.killpg(runs.read_json(run_dir)["pgid"], signal.SIGTERM)
    assert wait_for(lambda: runs.read_json(run_dir).get("status") in ("stopped", "failed", "done"), timeout=60)
    info = runs.read_json(run_dir)
    assert (info["status"], info["exit_code"]) == ("stopped", 3), info
    stop = events(run_dir, "stopped")[-1]["step"]
    assert 4 <= stop < 48 and (run_dir / f"checkpoint-{stop}" / "adapter_model.safetensors").exists()
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists() and not (run_dir / "adapter" / "ref").exists()
    cfg_path = run_dir / "config.yaml"  # the rest at full speed (samples change no training number)
    cfg_path.write_text(cfg_path.read_text().replace("sample_every: 1\n", "sample_every: 0\n"))
    out = lorastudio("resume", str(run_dir))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert events(run_dir, "resume")[-1]["step"] == stop
    ref = {e["step"]: e for e in events(dpo_run, "step")}
    resumed = [e for e in events(run_dir, "step") if e["time"] > events(run_dir, "resume")[-1]["time"]]
    assert [e["step"] for e in resumed] == list(range(stop + 1, 49))
    for e in resumed:
        for k in ("loss", "rewards/margins", "rewards/chosen"):
            assert e[k] == pytest.approx(ref[e["step"]][k], rel=1e-4, abs=1e-6), (e["step"], k)


def test_preference_columns_are_mapped_like_the_sft_formats(tmp_path):
    rows = [{"q": "Hi", "good": "Hello", "bad": "No"}] * 3
    cols = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    pairs, report = P.load_file(_jsonl(tmp_path / "m.jsonl", rows), columns=cols)
    assert report.format == "preference" and report.rows_used == 3
    assert pairs[0]["rejected"]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No"}]
    conv = [{"conv": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "A"},
             "rejected": {"from": "gpt", "value": "B"}}]
    pairs, _ = P.load_file(_jsonl(tmp_path / "c.jsonl", conv), columns={"conversations": "conv"})
    assert pairs[0]["chosen"]["messages"][-1] == {"role": "assistant", "content": "A"}
