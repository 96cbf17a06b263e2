"""Web app handlers: plain unit tests of the data-returning helpers (no server), and gradio_client
tests of each tab's main endpoint against a real launched server (stable api_names, JSON data)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

# The app reads local paths only inside its allowed folders (core.access); tests write under /tmp.
os.environ.setdefault("LORASTUDIO_ALLOW_DIRS", "/tmp")
TOKEN = "test-token-" + os.urandom(8).hex()  # the app's access token (webui.auth), fixed for tests

# Form values in the order /start takes them after the preset: the other tabs' fields, then the FORM table.
from lorastudio.webui.train_form import CONTEXT, FORM_NAMES  # noqa: E402

START_NAMES = CONTEXT + FORM_NAMES


# ---------------------------------------------------------------- a real server (shared helper)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(log_path: Path, timeout: float = 90):
    """Launch `lorastudio webui` on a free port -> (url, Popen). Waits until HTTP answers."""
    import urllib.request

    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "lorastudio.cli", "webui", "--port", str(port)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "LORASTUDIO_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited {proc.returncode}: {Path(log_path).read_text()[-2000:]}")
        try:
            req = urllib.request.Request(url + "config", headers={"Authorization": f"Bearer {TOKEN}"})
            urllib.request.urlopen(req, timeout=2).read()
            return url, proc
        except OSError:
            time.sleep(0.3)
    os.killpg(proc.pid, 9)
    raise RuntimeError(f"app did not start in {timeout}s")


def stop_app(proc) -> None:
    try:
        os.killpg(proc.pid, 15)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    url, proc = start_app(tmp_path_factory.mktemp("app") / "app.log")
    yield url, proc
    stop_app(proc)


@pytest.fixture(scope="module")
def app_url(app):
    return app[0]


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False, headers={"Authorization": f"Bearer {TOKEN}"})


def wait_run(client, run_dir: str, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = client.predict(run_dir, api_name="/run_status")
        if s.get("status") in ("done", "failed", "stopped"):
            return s
        time.sleep(1)
    raise AssertionError(f"run did not finish in {timeout}s: {s}")


@pytest.fixture(scope="module")
def trained_run(client):
    """A tiny_smoke run started through the app's /start (the form as the preset fills it)."""
    form = dict(zip(START_NAMES, client.predict("tiny_smoke", api_name="/load_preset")))
    form.update(max_steps=20, save_steps=10, eval_steps=10, sample_every=0, run_name="handlers-run")
    run_dir, md, cmd = client.predict(preset="tiny_smoke", **form, api_name="/start")
    assert run_dir and "started" in md, md
    assert cmd == f"lorastudio train {run_dir}/config.yaml"
    status = wait_run(client, run_dir)
    assert status["status"] == "done", status
    return run_dir, status


# ---------------------------------------------------------------- unit tests: pure helpers

def test_parse_sources_and_columns():
    from lorastudio.webui.helpers import parse_columns, parse_sources

    assert parse_sources("a.jsonl\n\n b.csv | 0.5 \n") == [{"path": "a.jsonl"}, {"path": "b.csv", "ratio": 0.5}]
    with pytest.raises(ValueError, match="ratio"):
        parse_sources("a.jsonl | lots")
    with pytest.raises(ValueError, match="no dataset"):
        parse_sources("  \n")
    assert parse_columns("instruction=question, output = answer") == {"instruction": "question", "output": "answer"}
    assert parse_columns("") is None
    with pytest.raises(ValueError, match="key=column"):
        parse_columns("instruction")


def test_histogram_splits_bins_at_the_cutoff():
    from lorastudio.webui.histogram import caption, histogram_html, length_histogram

    h = length_histogram([3, 5, 12, 18, 40, 41], cutoff=20, bins=10)
    assert h["width"] == 5 and h["rows"] == 6 and h["over"] == 2
    assert sum(b["within"] + b["over"] for b in h["bins"]) == 6
    assert [(b["start"], b["over"]) for b in h["bins"] if b["over"]] == [(40, 2)]
    assert caption(h).startswith("33.3% of rows exceed the cutoff of 20 tokens: truncated")
    svg = histogram_html(h)
    assert 'class="cutoff" data-cutoff="20"' in svg and "NaN" not in svg and svg.count('class="bar over"') == 1
    # the cutoff is inside the x range even when every row is shorter
    h = length_histogram([10, 11, 12], cutoff=1024)
    assert h["bins"][-1]["end"] > 1024 and caption(h).startswith("Every row fits within the cutoff of 1,024")


def test_histogram_empty_states_are_plain_sentences():
    from lorastudio.webui.histogram import histogram_html, length_histogram

    for h in (None, length_histogram([], 64)):
        out = histogram_html(h)
        assert "<svg" not in out and "NaN" not in out and "press Analyze" in out
    one = histogram_html(length_histogram([14], 64))
    assert "<svg" not in one and "One row of 14 tokens" in one


def test_stats_view_replaces_every_view(tmp_path):
    """An analysis sets every view of the tab: a failed one leaves no rows or histogram of the file
    before; the next good one clears the error."""
    from lorastudio.webui.tab_dataset import stats_view

    good = _write_jsonl(tmp_path / "good.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                               {"role": "assistant", "content": "a " * (i * 10 + 1)}]}
                                                 for i in range(12)])
    args = ("builtin:tiny", str(good), "auto", "", "auto", "", 32, False)
    v = stats_view(*args)
    assert v["error"] is None and "good.jsonl" in v["summary"] and len(v["rows"]) == 12
    assert v["histogram"]["rows"] == 12 and v["histogram"]["over"] > 0
    bad = stats_view("builtin:tiny", str(tmp_path / "gone.jsonl"), "auto", "", "auto", "", 32, False)
    assert bad["error"] and "gone.jsonl" in bad["summary"] and bad["histogram"] is None
    assert len(bad["rows"]) == 0 and len(bad["skipped"]) == 0 and bad["page_md"] == ""
    assert stats_view(*args)["error"] is None


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_dataset_stats_counts_skipped_and_truncated(tmp_path):
    from lorastudio.webui.tab_dataset import dataset_stats, rows_page, summary_markdown

    good = {"messages": [{"role": "user", "content": "hi " * 3}, {"role": "assistant", "content": "hello " * 30}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    f = _write_jsonl(tmp_path / "d.jsonl", [good, short, "not json", {"messages": []}, short])
    s = dataset_stats("builtin:tiny", str(f), "auto", "", "auto", "", cutoff=24)
    assert s["rows_used"] == 3 and s["rows_skipped"] == 2
    assert [x["row"] for x in s["skipped"]] == [3, 4]
    assert s["truncated"] == 1 and len(s["lengths"]) == 3
    assert s["sources"][0]["format"] == "openai"
    md = summary_markdown(s)
    assert "3 rows used" in md and "2 skipped" in md and "1 truncated" in md
    df, total, pages = rows_page(str(f), page=1, page_size=2)
    assert total == 3 and pages == 2 and len(df) == 2
    df, _, _ = rows_page(str(f), page=9, page_size=2)  # clamped to the last page
    assert len(df) == 1


def test_dataset_stats_format_override_and_mix(tmp_path):
    from lorastudio.webui.tab_dataset import dataset_stats

    qa = _write_jsonl(tmp_path / "a.jsonl", [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}])
    s = dataset_stats("builtin:tiny", str(qa), "alpaca", "instruction=question, output=answer", "chatml", "", 128)
    assert s["sources"][0]["format"] == "alpaca" and s["rows_used"] == 2
    inst = _write_jsonl(tmp_path / "b.jsonl", [{"instruction": "q", "output": "a"}])
    s = dataset_stats("builtin:tiny", f"{inst} | 2 | alpaca\nbuiltin:sample", "auto", "", "auto", "", 128)
    assert [x["format"] for x in s["sources"]] == ["alpaca", "openai"] and s["sources"][0]["ratio"] == 2.0


@pytest.mark.slow
def test_dataset_stats_of_2k_rows_equal_encode_example(tmp_path):
    """The tab's stats (core.labels.encode_examples in chunks, on two threads, cached per file)
    equal a direct computation with encode_example, at several cutoffs."""
    import random

    from lorastudio.core import labels
    from lorastudio.core.analysis import load_source, tokenizer_and_template
    from lorastudio.webui.tab_dataset import dataset_stats

    rng = random.Random(3)
    words = "the a cat dog sun tree book fish bird rain milk star red blue big small fast slow café 🙂".split()
    rows = []
    for i in range(2000):
        msgs = [{"role": "system", "content": "Be brief."}] if i % 5 == 0 else []
        for _ in range(rng.choice([1, 1, 2, 3])):
            msgs.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 30)))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 150)))})
        rows.append({"messages": msgs})
    # one row whose answer lies entirely beyond a small cutoff
    rows.append({"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]})
    f = _write_jsonl(tmp_path / "gen2k.jsonl", rows + ["not json"])
    for template in ("auto", "chatml"):
        tokenizer, tmpl = tokenizer_and_template("builtin:tiny", template, "", False)
        examples, _ = load_source(str(f))
        encs = [labels.encode_example(tokenizer, tmpl, ex) for ex in examples]
        for cutoff in (1024, 128, 40):
            s = dataset_stats("builtin:tiny", str(f), "auto", "", template, "", cutoff)
            kept = [sum(e.mask[:cutoff]) for e in encs]
            cut = [labels.encode_example(tokenizer, tmpl, ex, max_length=cutoff) for ex in examples]
            assert [c.n_trained for c in cut] == kept
            lens = sorted(len(e.input_ids) for e in encs)
            assert s["rows_used"] == 2001 and s["rows_skipped"] == 1 and s["tokenized"] == 2001
            assert s["lengths"] == [len(e.input_ids) for e in encs]
            assert s["truncated"] == sum(c.truncated for c in cut)
            assert s["truncated"] > 0 or cutoff == 1024
            assert s["tokens"] == sum(len(c.input_ids) for c in cut)
            assert s["trained_tokens"] == sum(kept)
            assert s["no_trained_after_cutoff"] == sum(k == 0 for k in kept)
            assert (s["length_mean"], s["length_p50"], s["length_p90"], s["length_max"]) == (
                round(sum(lens) / len(lens), 1), lens[len(lens) // 2], lens[int(0.9 * (len(lens) - 1))], lens[-1])
    assert s["no_trained_after_cutoff"] >= 1  # cutoff 40: the long-prompt row


def test_the_form_is_one_table_whose_defaults_are_the_configs():
    """FORM is the one source of the form: its empty values are RunConfig's defaults (LoRA dropout
    0.0 in the form and in config.yaml alike), and they build exactly the default config."""
    from lorastudio.core.config import RunConfig
    from lorastudio.webui import train_form

    d = train_form.defaults()
    assert d["lora_dropout"] == RunConfig().lora.dropout == 0.0 and d["lora_r"] == RunConfig().lora.r
    assert train_form.build_config(None, d).model_dump() == RunConfig().model_dump()
    assert len({f.name for f in train_form.FORM}) == len(train_form.FORM)
    for f in train_form.FORM:  # every field lands where its path says
        node = RunConfig().model_dump()
        for part in f.path.split("."):
            node = node[part]


def test_start_api_takes_the_forms_names(client):
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/start"]["parameters"]
    assert [p["parameter_name"] for p in params] == ["preset"] + START_NAMES


def test_build_config_from_preset_and_form():
    from lorastudio.webui.train_form import build_config, preset_form

    form = preset_form("tiny_smoke")
    assert form["model"] == "builtin:tiny" and form["max_steps"] == 30 and form["cutoff"] == 128
    cfg = build_config("tiny_smoke", {**form, "method": "qlora", "quant_bits": 8, "lora_targets": "q_proj, v_proj",
                                      "sample_prompts": "a\n\nb", "data": "builtin:sample | 0.5"})
    assert cfg.method == "qlora" and cfg.quantization.bits == 8
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.training.sample_prompts == ["a", "b"] and cfg.data.sources[0].ratio == 0.5
    cfg = build_config("tiny_smoke", {**form, "method": "lora"})
    assert cfg.quantization.bits is None
    assert form["report_to"] == "none"  # the tracker: metrics.jsonl alone unless asked
    assert build_config("tiny_smoke", {**form, "report_to": "tensorboard"}).training.report_to == "tensorboard"
    from lorastudio.core.config import ConfigError

    with pytest.raises(ConfigError, match="training.learning_rate"):
        build_config("tiny_smoke", {**form, "learning_rate": -1})


def test_start_with_a_bad_form_is_a_message():
    from lorastudio.webui.train_form import preset_form
    from lorastudio.webui.tab_train import start_from_dict

    run_dir, md, cmd = start_from_dict("tiny_smoke", {**preset_form("tiny_smoke"), "lora_dropout": 3})
    assert run_dir == "" and md.startswith("**Error:**") and "lora.dropout" in md and "Traceback" not in md


def _fake_run(root: Path, name: str, status: str = "done", lr: float = 1e-3) -> Path:
    from lorastudio.core import runs

    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"model:\n  name_or_path: builtin:tiny\nmethod: lora\ntraining:\n  learning_rate: {lr}\n")
    runs.write_json(d, status=status, created=time.time())
    for step, loss in [(1, 3.0), (2, 2.5), (3, 2.0), (4, 1.8)]:
        runs.append_event(d, "step", step=step, loss=loss, lr=lr, total_steps=4, tokens_per_s=100.0, mem_mb=50.0,
                          eta_s=1.0)
    runs.append_event(d, "eval", step=2, eval_loss=2.2)
    runs.append_event(d, "eval", step=4, eval_loss=2.4)
    for s in (2, 4):
        (d / f"checkpoint-{s}").mkdir()
        (d / f"checkpoint-{s}" / "adapter_config.json").write_text("{}")
    runs.append_event(d, "sample", step=4, prompt="hi", reply="hello")
    return d


def test_history_helpers(tmp_path):
    from lorastudio.core import history

    a, b = _fake_run(tmp_path, "a"), _fake_run(tmp_path, "b", lr=2e-3)
    c = history.curves(a)
    assert [s for s, _ in c["loss"]] == [1, 2, 3, 4] and c["eval_loss"] == [(2, 2.2), (4, 2.4)]
    assert history.best_checkpoint(a)["step"] == 2  # lowest eval loss, not the last
    (a / "checkpoint-2").rename(a / "gone")  # a deleted checkpoint can't be the best
    assert history.best_checkpoint(a)["step"] == 4
    assert history.config_diff(a, b) == [{"key": "training.learning_rate", "a": 1e-3, "b": 2e-3}]
    s = history.summarize(b)
    assert s["best_checkpoint"] == 2 and s["best_eval_loss"] == 2.2 and s["disk_mb"] >= 0 and s["step"] == 4
    with pytest.raises(ValueError, match="outside the workspace"):
        history.delete_run(a)


@pytest.mark.slow
def test_delete_run_refuses_active_runs_and_deletes_finished_ones():
    from lorastudio.core import history, runs, workspace

    d = _fake_run(workspace.runs_dir(), f"del-{time.time_ns()}")
    runs.launch(d, python_args=["-c", "import time; time.sleep(600)"])  # a live job of this app
    with pytest.raises(ValueError, match="still starting"):
        history.delete_run(d)
    assert runs.stop(d, grace=1) == "stopped"
    runs.write_json(d, status="done")
    history.delete_run(d)
    assert not d.exists()


def test_run_view_and_status_markdown():
    from lorastudio.core import workspace
    from lorastudio.webui.train_view import curve_frames, run_view, status_markdown

    v = run_view(str(_fake_run(workspace.runs_dir(), f"view-{time.time_ns()}")))
    assert v["status"] == "done" and v["step"] == 4 and len(v["loss"]) == 4
    md = status_markdown(v)
    assert "step 4/4" in md and "4 loss points" in md and "checkpoint-2" in md
    # a CUDA run's speed path (run.json): every part that is on, by name
    v["speed_path"] = {"padding_free": True, "pad_to_multiple_of": 64, "fused_lora": True, "tiled_mlp": True,
                       "gradient_checkpointing": True, "kernels": "all", "optimizer": "adamw_torch_fused"}
    assert ("speed path: padding-free, checkpointing, fused LoRA layers, tiled MLP, rows padded to ×64; "
            "kernels all; optimizer adamw_torch_fused") in status_markdown(v)
    v["speed_path"]["checkpoint_layers"] = 20  # the memory plan checkpointed some layers only
    assert "speed path: padding-free, checkpointing (20 layers), fused LoRA" in status_markdown(v)
    loss, lr = curve_frames(v)
    assert set(loss["series"]) == {"loss", "eval_loss"} and len(lr) == 4
    assert run_view("")["status"] == ""


def test_model_info_reads_files_only(tmp_path):
    from lorastudio.webui.tab_model import model_info, model_info_view

    info = model_info("builtin:tiny")
    assert info["architecture"] == "LlamaForCausalLM" and info["parameters"] > 1_000_000
    assert info["has_chat_template"] and info["vocab_size"]
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"architectures": ["X"], "auto_map": {"AutoModel": "m.X"}}))
    assert any("trust_remote_code" in w for w in model_info(str(remote))["warnings"])
    assert any("runs Python" in w for w in model_info(str(remote), True)["warnings"])
    info, md = model_info_view(str(tmp_path / "missing"), False)
    assert info == {} and md.startswith("**Error:**")


def test_template_names_match_the_core():
    from lorastudio.core import templates
    from lorastudio.webui.tab_template import NAMED

    assert sorted(NAMED) == sorted(templates.NAMED)


def test_chat_message_normalisation():
    from lorastudio.webui.tab_chat import to_messages

    hist = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "yo"},
            {"role": "system", "content": "x"}]
    assert to_messages(hist) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_readable_jinja_renders_exactly_as_the_one_line_template():
    """The editor shows a one-line template laid out by tag; line breaks go only where Jinja trims
    them, so the rendered text and the trained spans are the same (core.analysis renders both)."""
    from lorastudio.core import analysis
    from lorastudio.webui.tab_template import readable_jinja

    own = analysis.own_template_source("builtin:tiny")
    laid_out = readable_jinja(own)
    assert "\n" not in own and laid_out.count("\n") >= 5 and laid_out.replace("\n", "").replace(" ", "") == \
        own.replace(" ", "")
    a, b = (analysis.render_template("builtin:tiny", "custom", t) for t in (laid_out, own))
    assert {k: v for k, v in a.items() if k != "source"} == {k: v for k, v in b.items() if k != "source"}
    assert a["text"] and a["trained_spans"]
    # quotes holding tag characters, a comment, no trimming: nothing is moved where it would show
    tricky = "{{- '%}{{' -}}{# c #}{% if x %}{{ y }}{% endif %}{{ a }}{{- b }}"
    out = readable_jinja(tricky)
    assert out.replace("\n", "") == tricky.replace("\n", "") and "{% if x %}{{ y }}{% endif %}" in out
    assert readable_jinja("{% raw %}{%- x -%}{%- y -%}{% endraw %}") == "{% raw %}{%- x -%}{%- y -%}{% endraw %}"
    assert readable_jinja("{%- a -%}\n{%- b -%}") == "{%- a -%}\n{%- b -%}"  # the author's layout stays


def test_button_states_follow_the_run():
    from lorastudio.webui.tab_train import button_states

    assert button_states({}) == {"stop": False, "resume": False, "retry": False}
    assert button_states({"status": "running"}) == {"stop": True, "resume": False, "retry": False}
    assert button_states({"status": "failed"}) == {"stop": False, "resume": True, "retry": True}
    assert button_states({"status": "done"}) == {"stop": False, "resume": False, "retry": False}


def test_a_second_start_of_the_same_form_is_refused(client):
    """One click, one run: two Starts of one form at once start one run; a third while it runs is
    refused too; another form starts."""
    from concurrent.futures import ThreadPoolExecutor

    from lorastudio.core import workspace

    form = dict(zip(START_NAMES, client.predict("tiny_smoke", api_name="/load_preset")))
    form.update(max_steps=8, save_steps=100, eval_steps=100, sample_every=0, run_name=f"twice-{os.getpid()}")
    before = set(workspace.runs_dir().iterdir())
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: client.predict(preset="tiny_smoke", **form, api_name="/start"), range(2)))
    started = [a for a in answers if a[0]]
    assert len(started) == 1, answers
    refused = next(a for a in answers if not a[0])
    assert refused[1].startswith("**Error:**") and "same form" in refused[1]
    again = client.predict(preset="tiny_smoke", **form, api_name="/start")
    assert again[0] == "" and "same form" in again[1] and "not started again" in again[1], again
    new = [d for d in set(workspace.runs_dir().iterdir()) - before if (d / "run.json").exists()]
    assert [str(d) for d in new] == [started[0][0]]
    assert wait_run(client, started[0][0])["status"] == "done"


def test_checkpoint_choices(tmp_path):
    from lorastudio.webui.tab_convert import checkpoint_choices

    d = _fake_run(tmp_path, "c")
    assert checkpoint_choices(str(d)) == ["checkpoint-4", "checkpoint-2"]
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_config.json").write_text("{}")
    assert checkpoint_choices(str(d))[0] == "final"


# ---------------------------------------------------------------- gradio_client against a real server

def test_model_info_api(client):
    info, md = client.predict("builtin:tiny", False, api_name="/model_info")
    assert info["architecture"] == "LlamaForCausalLM" and "Parameters" in md
    info, md = client.predict("/no/such/model", False, api_name="/model_info")
    assert md.startswith("**Error:**") and "Traceback" not in md


def test_dataset_stats_api(client, tmp_path):
    s = client.predict("builtin:tiny", "builtin:sample", "auto", "", "auto", "", 128, False, api_name="/dataset_stats")
    assert s["rows_used"] >= 100 and s["sources"][0]["format"] == "openai"
    bins = s["histogram"]["bins"]
    assert bins and sum(b["within"] + b["over"] for b in bins) == s["tokenized"]
    assert sum(b["over"] for b in bins) == s["truncated"] == s["histogram"]["over_cutoff"]
    bad = _write_jsonl(tmp_path / "bad.jsonl", ["nope", {"messages": [{"role": "user", "content": "a"},
                                                                      {"role": "assistant", "content": "b"}]}])
    s = client.predict("builtin:tiny", str(bad), "auto", "", "auto", "", 128, False, api_name="/dataset_stats")
    assert s["rows_used"] == 1 and s["rows_skipped"] == 1 and "invalid JSON" in s["skipped"][0]["reason"]
    s = client.predict("builtin:tiny", str(tmp_path / "missing.jsonl"), "auto", "", "auto", "", 128, False,
                       api_name="/dataset_stats")
    assert "missing.jsonl" in s["error"] and "Traceback" not in s["error"]


def test_dataset_rows_api(client):
    rows, md = client.predict("builtin:sample", "auto", "", 2, api_name="/dataset_rows")
    assert len(rows["data"]) == 20 and rows["data"][0][1] == 21 and md.startswith("page 2 of")


def test_upload_api_copies_into_the_workspace(client, tmp_path):
    from gradio_client import handle_file

    from lorastudio.core import workspace

    f = _write_jsonl(tmp_path / "up.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                          {"role": "assistant", "content": "b"}]}])
    path, md = client.predict(handle_file(str(f)), "builtin:sample", api_name="/upload")
    assert Path(path).is_file() and Path(path).is_relative_to(workspace.uploads_dir()) and "uploaded" in md


def test_template_api(client):
    pieces, md = client.predict("builtin:tiny", "chatml", "", False, "", "auto", 0, False, api_name="/template")
    trained = [p["token"] for p in pieces if p["class_or_confidence"] == "trained"]
    assert trained == ["Paris.<|im_end|>", "Rome.<|im_end|>"] and "chatml" in md
    pieces, md = client.predict("builtin:tiny", "custom", "{% for m in messages %}", False, "", "auto", 0, False,
                                api_name="/template")
    assert pieces == [] and md.startswith("**Error:**")
    src, md = client.predict("builtin:tiny", "auto", False, api_name="/template_source")
    assert "im_start" in src and src.count("\n") >= 5  # laid out one tag a line, not one long line
    assert "stays **auto**" in md and "custom" in md  # the choice is not switched behind the user's back


def test_preview_full_api_respects_the_cutoff(client):
    pieces, md = client.predict("builtin:tiny", "builtin:sample", "auto", "", "auto", 2, 8, False,
                                api_name="/preview_full")
    assert "2 samples" in md and any("truncated" in p["token"] for p in pieces if p["class_or_confidence"] is None)


def test_train_run_status_history_and_diff(client, trained_run):
    run_dir, s = trained_run
    assert len(s["loss"]) >= 3 and s["step"] == 20 and s["eval_loss"]
    assert s["best"]["step"] in (10, 20) and "20/20" in s["status_md"]
    assert Path(run_dir, "config.yaml").read_text().startswith(f"# lorastudio train {run_dir}/config.yaml")
    table = client.predict(api_name="/history")
    assert Path(run_dir).name in [row[0] for row in table["data"]]
    diff = client.predict(run_dir, run_dir, api_name="/config_diff")
    assert diff["data"] == [] or diff["data"] == [["", "", ""]] or not any(diff["data"][0])
    assert client.predict(run_dir, api_name="/stop").startswith("stop: **done")
    assert client.predict(run_dir, api_name="/resume").startswith("**Error:**")
    md = client.predict("/tmp/not-a-run", api_name="/delete_run")
    assert md.startswith("**Error:**")


def test_convert_and_chat(client, trained_run):
    run_dir, _ = trained_run
    r = client.predict(run_dir, "checkpoint-10", "export adapter", "auto", api_name="/convert_run")
    assert r["ok"] and Path(r["out"], "adapter_config.json").exists()
    r = client.predict(run_dir, "final", "merge", "auto", api_name="/convert_run")
    assert r["ok"] and r["verification"]["passed"], r
    again = client.predict(run_dir, "final", "merge", "auto", api_name="/convert_run")
    assert not again["ok"] and "already exists" in again["error"]
    r = client.predict("What is your name?", run_dir, "final", "fine-tuned", "", 0.7, 0.9, 8, True,
                       api_name="/chat_once")
    assert "reply" in r, r
    left, right = client.predict("What is your name?", run_dir, "final", "", 0.7, 0.9, 8, True, api_name="/compare")
    assert left[-1]["role"] == "assistant" and right[-1]["role"] == "assistant"
    assert "⚠️" not in json.dumps(left + right)
    # two checkpoints side by side (left: checkpoint-10, right: the final adapter)
    left, right = client.predict("What is your name?", run_dir, "final", "", 0.7, 0.9, 8, True, "checkpoint-10",
                                 api_name="/compare")
    assert left[-1]["role"] == "assistant" and right[-1]["role"] == "assistant"
    assert "⚠️" not in json.dumps(left + right)
    hist, box = client.predict("Hello", [], run_dir, "checkpoint-10", "base", "", 0.7, 0.9, 8, True,
                               api_name="/chat")
    assert [m["role"] for m in hist] == ["user", "assistant"] and box == ""
    assert client.predict(api_name="/unload").startswith("unloaded")


def loaded_libraries(pid: int) -> set[str]:
    """The shared libraries a process has mapped (what importing torch or tokenizers leaves)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {Path(line.split()[-1]).name for line in maps.splitlines() if ".so" in line.split()[-1]}


def test_the_server_process_never_loads_torch_or_transformers(app, client, trained_run):
    """The design's rule, read from the server process itself after it previewed a dataset,
    rendered a template, merged and chatted: torch, tokenizers and safetensors (what transformers
    and trl load) live in its children only."""
    url, proc = app
    run_dir, _ = trained_run
    client.predict("builtin:tiny", "builtin:sample", "auto", "", "auto", 2, 0, False, api_name="/preview_full")
    client.predict("builtin:tiny", "chatml", "", False, "", "auto", 0, False, api_name="/template")
    r = client.predict("What is your name?", run_dir, "final", "fine-tuned", "", 0.7, 0.9, 8, True,
                       api_name="/chat_once")
    assert "reply" in r, r
    libs = loaded_libraries(proc.pid)
    assert any("pydantic_core" in n for n in libs), libs  # the reading sees extension modules (gradio's pydantic)
    # (watchfiles' _rust_notify is uvicorn's file watcher, loaded whenever watchfiles is installed:
    # the [track] extra brings it; it is not what transformers loads)
    heavy = sorted(n for n in libs if n.startswith(("libtorch", "libc10", "tokenizers", "_safetensors", "_rust"))
                   and not n.startswith("_rust_notify"))
    assert heavy == [], heavy
    import psutil

    assert psutil.Process(proc.pid).memory_info().rss < 400 * 2 ** 20  # torch alone maps ~300 MiB more


def test_the_app_needs_its_access_token(app_url):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(app_url + "config", timeout=5)
    assert e.value.code == 401
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(urllib.request.Request(app_url + "config", headers={"Authorization": "Bearer nope"}),
                               timeout=5)
    # ?token= is traded for a cookie (a browser's first visit)
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    assert opener.open(app_url + f"?token={TOKEN}", timeout=10).status == 200
    assert opener.open(app_url + "config", timeout=10).status == 200


def test_paths_outside_the_allowed_folders_are_refused(client):
    s = client.predict("builtin:tiny", "/etc/passwd", "auto", "", "auto", "", 128, False, api_name="/dataset_stats")
    assert "outside the folders" in s["error"]
    info, md = client.predict("/etc", False, api_name="/model_info")
    assert "outside the folders" in md
    assert "not a run of this workspace" in client.predict("/etc", api_name="/run_status")["error"]


@pytest.mark.slow
def test_retry_refuses_a_finished_run_and_retries_a_failed_one():
    from lorastudio.core import runs, workspace
    from lorastudio.webui.tab_train import retry
    from lorastudio.webui.train_view import run_view, status_markdown

    d = _fake_run(workspace.runs_dir(), f"oom-{time.time_ns()}")
    # a real, short config: the retry below really launches it
    (d / "config.yaml").write_text("training:\n  micro_batch_size: 8\n  grad_accum: 2\n  max_steps: 2\n"
                                   "  sample_every: 0\n")
    new, md = retry(str(d))
    assert new == "" and "only a failed run" in md
    runs.write_json(d, status="failed", error="out of GPU memory", retry={"training.micro_batch_size": 4,
                                                                         "training.grad_accum": 4})
    assert "Retry" in status_markdown(run_view(str(d)))
    new, md = retry(str(d))
    assert new.endswith("-retry") and "retrying" in md
    assert "micro_batch_size: 4" in Path(new, "config.yaml").read_text()
    deadline = time.time() + 120
    while time.time() < deadline and runs.status(new).get("status") not in ("done", "failed"):
        time.sleep(0.5)
    assert runs.status(new)["status"] == "done", runs.log_tail(new)


def test_early_stopping_from_the_form():
    from lorastudio.core import config as config_lib
    from lorastudio.webui.train_form import build_config, preset_form

    assert preset_form("tiny_smoke")["early_stopping"] == 0
    cfg = build_config("tiny_smoke", {"early_stopping": 3, "eval_steps": 10, "save_steps": 10, "eval_split": 0.1})
    assert cfg.training.early_stopping_patience == 3
    assert build_config("tiny_smoke", {"early_stopping": 0}).training.early_stopping_patience is None
    with pytest.raises((config_lib.ConfigError, ValueError), match="save_steps"):
        build_config("tiny_smoke", {"early_stopping": 2, "eval_steps": 4, "save_steps": 6, "eval_split": 0.1})


def test_multi_gpu_fields_from_the_form():
    from lorastudio.core import config as config_lib
    from lorastudio.webui.train_form import build_config, preset_form

    f = preset_form("tiny_smoke")
    assert (f["gpus"], f["strategy"], f["offload"]) == (1, "ddp", False)
    cfg = build_config("tiny_smoke", {"gpus": 2, "strategy": "fsdp", "offload": True})
    assert (cfg.training.gpus, cfg.training.strategy, cfg.training.offload) == (2, "fsdp", True)
    with pytest.raises((config_lib.ConfigError, ValueError), match="training.offload"):
        build_config("tiny_smoke", {"gpus": 2, "strategy": "ddp", "offload": True})
