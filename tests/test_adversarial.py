"""An adversarial suite of our own: templates that grow, YAML anchor bombs, huge and negative
numbers in every numeric field, paths to devices, FIFOs and symlinks, crafted run.json and
metrics.jsonl files, and concurrent Starts, Stops, deletes and merges. Each case must end in a
sentence for people (or a plain result), quickly, with nothing signalled or written that
should not be. (bench/fuzz.py runs the same readers on generated input.)"""

import json
import math
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import events, lorastudio, wait_for
from lorastudio.core import config, data, history, render, runs, safe_io, templates, workspace

MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
os.environ.setdefault("LORASTUDIO_ALLOW_DIRS", "/tmp")  # the web handlers read tmp_path files

# ---------------------------------------------------------------- templates that grow

NS = "{% set ns = namespace(x='a', l=[1], a=[1], b=[1]) %}"
GROWING = {
    "repeat": "{{ 'A' * 10**9 }}",
    "repeat-list": "{{ ([1] * 100000) * 100000 }}",
    "big-refs-joined": "{% set big = 'x' * 1000000 %}{{ ([big] * 100000)|join }}",
    "doubling-plus": NS + "{% for i in range(100) %}{% set ns.x = ns.x + ns.x %}{% endfor %}{{ ns.x }}",
    "doubling-tilde": NS + "{% for i in range(100) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}",
    "dag-printed": NS + "{% for i in range(60) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
    "dag-tojson": NS + "{% for i in range(60) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l|tojson }}",
    "dag-compared": NS + "{% for i in range(60) %}{% set ns.a = [ns.a, ns.a] %}{% set ns.b = [ns.b, ns.b] %}"
                         "{% endfor %}{{ ns.a == ns.b }}",
    "nested-loops": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "nested-output": "{% for a in range(100000) %}{% for b in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
    "set-block": "{% set s %}{% for a in range(100000) %}{% for b in range(1000) %}" + "x" * 40
                 + "{% endfor %}{% endfor %}{% endset %}{{ s|length }}",
    "macro-output": "{% macro m() %}{% for a in range(100000) %}" + "y" * 100 + "{% endfor %}{% endmacro %}"
                    "{% for i in range(1000) %}{{ m()|length }}{% endfor %}",
    "center": "{{ 'a'|center(1000000000) }}",
    "ljust": "{{ 'a'.ljust(1000000000) }}",
    "format-width": "{{ '{:>999999999}'.format('a') }}",
    "percent-width": "{{ '%999999999s' % 'a' }}",
    "percent-star": "{{ '%*s' % (999999999, 'a') }}",
    "replace-method": "{{ ('a' * 100000).replace('a', 'a' * 100000) }}",
    "replace-filter": "{{ ('a' * 100000)|replace('a', 'a' * 100000) }}",
    "indent": "{{ ('a\\n' * 100000)|indent('x' * 100000) }}",
    "wordwrap": "{{ ('a ' * 900000)|wordwrap(1, wrapstring='z' * 1000) }}",
    "power": "{{ 10 ** 100000 }}",
    "batch-fill": "{{ [1]|batch(1000000000, 'x')|list }}",
    "recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "recursive-loop": "{% for x in range(1000) recursive %}{{ loop(range(1000)) }}{% endfor %}",
    "deep-source": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "huge-source": "x" * (300 * 1024),
    "lipsum": "{{ lipsum(100000) }}",
}


@pytest.mark.parametrize("name", sorted(GROWING))
def test_a_template_that_grows_stops_with_a_message(name):
    t0 = time.time()
    with pytest.raises(templates.TemplateError) as e:
        render.render_batch(GROWING[name], [MSGS], track=True)
    assert time.time() - t0 < 15, name
    assert any(w in str(e.value) for w in ("stopped", "refused", "undefined")), str(e.value)


def test_a_long_conversation_still_renders():
    """The bounds grow with the conversation: a 3-million-character answer is a render, not a bomb."""
    long = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 600_000}]
    src = templates.NAMED["chatml"].source
    (text,), (spans,) = render.render_batch(src, [long], track=True)
    assert len(text) > 3_000_000 and spans


@pytest.mark.slow
def test_the_cli_preview_stops_a_template_that_grows(tmp_path):
    bomb = tmp_path / "bomb.jinja"
    bomb.write_text(GROWING["doubling-tilde"])
    d = tmp_path / "d.jsonl"
    d.write_text(json.dumps({"messages": MSGS}) + "\n")
    out = lorastudio("preview", "--model", "builtin:tiny", "--data", str(d), "--custom-template", str(bomb))
    assert out.returncode == 2 and "stopped" in out.stderr and "Traceback" not in out.stderr, out.stderr


# ---------------------------------------------------------------- YAML anchor bombs

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


FLOW_LAUGHS = "{a: &a [x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]" for p, c in zip("abcdefgh", "bcdefghi")) + "}"


def test_a_billion_laughs_config_is_refused_fast(tmp_path):
    t0 = time.time()
    with pytest.raises(safe_io.FileProblem, match="expands to more than"):
        safe_io.load_yaml(LAUGHS)
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(LAUGHS)
    with pytest.raises(config.ConfigError, match="expands to more than"):
        config.load(bomb)
    with pytest.raises(config.ConfigError, match="expands to more than"):
        config.apply_override({}, "training.sample_prompts=" + FLOW_LAUGHS)
    assert time.time() - t0 < 5
    out = lorastudio("train", str(bomb), "--detach")
    assert out.returncode == 2 and "expands to more than" in out.stderr


def test_yaml_nested_too_deeply_or_oversized_is_refused(tmp_path):
    with pytest.raises(safe_io.FileProblem, match="nested too deeply"):
        safe_io.load_yaml("[" * 100000 + "]" * 100000)
    big = tmp_path / "big.yaml"
    big.write_text("x: " + "a" * (5 * 2**20))
    with pytest.raises(config.ConfigError, match="at most 4 MiB"):
        config.load(big)


def test_a_run_with_a_bomb_for_a_config_still_lists_and_diffs(tmp_path):
    run = _crafted_run(workspace.runs_dir(), f"yaml-bomb-{time.time_ns()}", {"status": "done"}, b"")
    (run / "config.yaml").write_text(LAUGHS)
    try:
        t0 = time.time()
        assert history.load_config_dict(run) == {}
        assert history.config_diff(run, run) == []
        assert any(r["run"] == run.name for r in history.list_history())
        assert time.time() - t0 < 10
    finally:
        shutil.rmtree(run)


# ---------------------------------------------------------------- numbers in every numeric field

HUGE = [1e300, -1e300, 1e18, -1, 0, 2.5, math.nan, math.inf, -math.inf, "12abc", ""]


def _numeric_fields():
    from lorastudio.webui.train_form import FORM

    return [(f.name, f.label) for f in FORM if f.kind in ("int", "float", "optional_int", "optional_float")]


@pytest.mark.parametrize("name, label", _numeric_fields())
def test_every_numeric_form_field_takes_any_number_without_a_crash(name, label):
    """Each value either makes a valid config or is refused with the field named (its label or
    its config path); never another exception type, never a config past the bounds."""
    from lorastudio.webui.train_form import FORM, build_config

    path = next(f.path for f in FORM if f.name == name)
    for value in HUGE:
        try:
            cfg = build_config("tiny_smoke", {name: value})
        except (config.ConfigError, ValueError) as e:
            assert label.split(" (")[0].lower() in str(e).lower() or path in str(e), (name, value, str(e))
            continue
        got = cfg.model_dump()
        for part in path.split("."):
            got = got[part]
        assert got is None or math.isfinite(got), (name, value, got)


def test_every_numeric_config_field_is_bounded():
    """Every int/float of RunConfig refuses 1e300, -1e300, nan and inf with its path named."""
    def fields(model, prefix=""):
        for key, f in model.model_fields.items():
            ann = str(f.annotation)
            if hasattr(f.annotation, "model_fields"):
                yield from fields(f.annotation, f"{prefix}{key}.")
            elif ("int" in ann or "float" in ann) and "bool" not in ann and "dict" not in ann:
                yield f"{prefix}{key}"

    checked = 0
    for path in fields(config.RunConfig):
        for value in (1e300, -1e300, math.nan, math.inf):
            d: dict = {}
            node = d
            parts = path.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
            with pytest.raises(config.ConfigError) as e:
                config.from_dict(d)
            assert path in str(e.value), (path, value, str(e.value))
        checked += 1
    assert checked >= 25


@pytest.mark.slow
def test_numbers_in_the_other_handlers():
    from lorastudio.webui import tab_chat, tab_dataset, tab_template
    from lorastudio.webui.helpers import number, whole

    for bad in (math.nan, math.inf, 1e300, -5, "x"):
        with pytest.raises(ValueError, match="Cutoff length"):
            whole(bad, "Cutoff length", 1, 1_048_576)
        with pytest.raises(ValueError, match="Max new tokens"):
            tab_chat.gen_kwargs(0.7, 0.9, bad, False)
        with pytest.raises(ValueError, match="Temperature"):
            tab_chat.gen_kwargs(bad if bad != -5 else 99, 0.9, 8, False)
        assert tab_dataset.preview_view("builtin:tiny", "builtin:sample", "auto", "", "auto", bad, 128,
                                        False)[1].startswith("**Error:**")
    assert number(0.5, "x", 0, 1) == 0.5
    assert tab_template.template_view("builtin:tiny", "auto", "", "builtin:sample", "auto", 10**12, False)[0]


# ---------------------------------------------------------------- paths: devices, FIFOs, symlinks

def test_special_files_as_data_get_a_sentence(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    sock_path = tmp_path / "sock.jsonl"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    link = tmp_path / "zero.jsonl"
    link.symlink_to("/dev/zero")
    null = tmp_path / "null.json"
    null.symlink_to("/dev/null")
    dangling = tmp_path / "gone.jsonl"
    dangling.symlink_to(tmp_path / "nowhere")
    try:
        for path, words in ((fifo, "named pipe (FIFO)"), (folder, "a folder"), (sock_path, "a socket"),
                            (link, "character device"), (null, "character device"),
                            (dangling, "not found")):
            t0 = time.time()
            with pytest.raises(data.DataError) as e:
                data.load_file(str(path))
            assert words in str(e.value) and time.time() - t0 < 2, (path, str(e.value))
    finally:
        sock.close()


def test_special_files_in_a_model_folder_never_block(tmp_path):
    from lorastudio.core import estimate
    from lorastudio.webui.tab_model import model_info

    m = tmp_path / "model"
    m.mkdir()
    os.mkfifo(m / "config.json")
    t0 = time.time()
    with pytest.raises(estimate.EstimateError):
        estimate.arch_for(str(m))
    with pytest.raises(ValueError, match="named pipe"):
        model_info(str(m))
    (m / "config.json").unlink()
    (m / "config.json").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="character device"):
        model_info(str(m))
    (m / "config.json").unlink()
    (m / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "big"}))
    with pytest.raises(estimate.EstimateError, match="not a usable model config"):
        estimate.arch_for(str(m))
    (m / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="not a safetensors file"):
        model_info(str(m))
    assert time.time() - t0 < 5


def test_a_symlink_into_the_runs_folder_is_not_a_run(tmp_path):
    from lorastudio.core.access import AccessError
    from lorastudio.webui.helpers import workspace_run

    outside = _crafted_run(tmp_path, "outside", {"status": "done"}, b"")
    link = workspace.runs_dir() / f"link-{time.time_ns()}"
    link.symlink_to(outside)
    try:
        with pytest.raises(AccessError, match="not a run of this workspace"):
            workspace_run(str(link))
        with pytest.raises(AccessError):
            workspace_run("../../etc")
        assert all(Path(r["run_dir"]) != link for r in runs.list_runs())  # symlinks are not listed
    finally:
        link.unlink()


# ---------------------------------------------------------------- crafted run.json and metrics.jsonl

def _crafted_run(parent: Path, name: str, run_json, metrics: bytes) -> Path:
    d = parent / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "run.json").write_bytes(run_json if isinstance(run_json, bytes) else json.dumps(run_json).encode())
    (d / "metrics.jsonl").write_bytes(metrics)
    return d


RUN_JSONS = {
    "list": [], "null": None, "string": "running", "status-list": {"status": ["running"]},
    "pid-string": {"status": "running", "pid": "abc", "pgid": "x"},
    "pid-init": {"status": "running", "pid": 1, "pgid": 1, "pid_start_time": psutil.Process(1).create_time()},
    "pid-self-no-start": {"status": "running", "pid": os.getpid(), "pgid": os.getpgrp()},
    "nan": b'{"status": "running", "pid": NaN, "created": Infinity}',
    "nested": b"[" * 100000 + b"]" * 100000,
    "huge": b'{"status": "done", "x": "' + b"a" * (5 * 2**20) + b'"}',
    "binary": bytes(range(256)) * 10,
}
METRICS = (b"\x00\xff garbage\n" + b'{"event": "step", "step": "abc", "loss": "nan"}\n'
           + b'{"event": "step", "step": 1, "loss": NaN}\n' + b'{"event": "step", "step": 2, "loss": Infinity}\n'
           + b"[1, 2, 3]\n" + b'"just a string"\n' + b'{"event": ["x"]}\n' + b'{"event": "eval", "step": {}}\n'
           + b'{"event": "step", "step": 3, "loss": 1.5, "total_steps": "9", "eta_s": []}\n'
           + b'{"event": "step", "' + b"k" * (2 * 2**20) + b'": 1}\n'
           + b'{"event": "step", "step": 4, "loss": 1.25, "lr": 0.001}\n')


@pytest.mark.parametrize("kind", sorted(RUN_JSONS))
def test_a_crafted_run_reads_without_a_crash_and_is_never_written(kind):
    from lorastudio.webui.train_view import run_api, status_markdown

    d = _crafted_run(workspace.runs_dir(), f"crafted-{kind}-{time.time_ns()}", RUN_JSONS[kind], METRICS)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    info = runs.status(d)
    assert isinstance(info, dict)
    assert info.get("status") in (None, "?", "failed", "done")  # no process of ours: never "running"
    v = run_api(str(d))
    assert v.get("run") == d.name, v  # a view, not {"error": ...}
    try:
        assert [p[0] for p in v["loss"]] == [3, 4] and [tuple(p) for p in v["lr"]] == [(4, 0.001)], v
        status_markdown(v)
        history.summarize(d)
        assert runs.stop(d, grace=1) in ("failed", "done", "unknown", "?")
        out = lorastudio("runs")
        assert out.returncode == 0, out.stderr
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # reads, stop and list wrote nothing
        assert psutil.pid_exists(1)
    finally:
        shutil.rmtree(d)


def test_metrics_read_in_bounded_pieces(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    with open(d / "metrics.jsonl", "wb") as f:
        f.write(b"x" * (runs.MAX_EVENTS_READ + 10))  # one enormous line, no newline yet
        f.write(b'\n{"event": "step", "step": 1, "loss": 1.0}\n')
    evs, off = runs.read_events(d)
    assert evs == [] and off == runs.MAX_EVENTS_READ
    evs, off = runs.read_events(d, off)
    assert [e["step"] for e in evs] == [1]


# ---------------------------------------------------------------- concurrency

def _start_run(tmp_path, name, *sets):
    run_dir = tmp_path / name
    out = lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(run_dir), "--detach",
                     "--set", "training.sample_every=0", "--set", "data.eval_split=0", *sets)
    assert out.returncode == 0, out.stderr
    return run_dir


@pytest.mark.slow
def test_two_resumes_at_once_start_one_child(tmp_path):
    run_dir = _start_run(tmp_path, "twice", "--set", "training.max_steps=100000", "--set", "training.save_steps=3")
    assert wait_for(lambda: (run_dir / "checkpoint-3" / "trainer_state.json").exists(), timeout=120)
    assert runs.stop(run_dir, grace=30) == "stopped"
    results = []

    def resume():
        try:
            results.append(runs.launch(run_dir, resume=True))
        except runs.LaunchError as e:
            results.append(e)

    threads = [threading.Thread(target=resume) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    started = [r for r in results if not isinstance(r, Exception)]
    assert len(started) == 1 and all("already running" in str(r) for r in results if isinstance(r, Exception))
    assert wait_for(lambda: runs.status(run_dir).get("status") == "running", timeout=120)
    assert runs.stop(run_dir, grace=30) == "stopped"


@pytest.mark.slow
def test_stop_ends_every_rank_even_while_they_start(tmp_path):
    from lorastudio.core import jobs

    run_dir = _start_run(tmp_path, "ranks", "--gpus", "2", "--set", "training.max_steps=100000")
    rec = jobs.record(run_dir)
    assert rec and wait_for(lambda: len(jobs.members(rec)) >= 2, timeout=60)  # the launcher and its ranks coming up
    t0 = time.time()
    runs.stop(run_dir, grace=3)
    assert time.time() - t0 < 3 + 15
    assert wait_for(lambda: not jobs.members(rec), timeout=10), [p.cmdline() for p in jobs.members(rec)]
    assert runs.status(run_dir)["status"] in ("stopped", "failed")


@pytest.mark.slow
def test_concurrent_starts_stops_deletes_and_merges(tmp_path):
    from lorastudio.webui import tab_convert, tab_train

    # starts: four of one form at once are one run, the others refused (one click, one run);
    # four forms that differ but share a run name get four folders (never a shared one)
    form = tab_train.preset_form("tiny_smoke")
    name = f"same-{time.time_ns()}"
    form.update(max_steps=100000, save_steps=100000, sample_every=0, eval_split=0, run_name=name)
    out = []
    threads = [threading.Thread(target=lambda: out.append(tab_train.start_from_dict("tiny_smoke", dict(form))))
               for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    started = [r[0] for r in out if r[0]]
    assert len(started) == 1 and sum("one click, one run" in r[1] for r in out) == 3, out
    out = []
    threads = [threading.Thread(target=lambda i=i: out.append(tab_train.start_from_dict(
        "tiny_smoke", {**form, "max_steps": 100000 + i}))) for i in range(1, 4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    dirs = started + [r[0] for r in out]
    assert all(dirs) and len(set(dirs)) == 4 and all(Path(d).name.startswith(name) for d in dirs), out
    # deletes while they run are refused; stops and deletes at once end every one of them
    assert "still" in tab_train.delete(dirs[0]) or "in use" in tab_train.delete(dirs[0])
    msgs = []
    threads = [threading.Thread(target=lambda d=d: msgs.append(tab_train.stop(d))) for d in dirs]
    threads += [threading.Thread(target=lambda d=d: msgs.append(tab_train.delete(d))) for d in dirs[:2]]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(runs.status(d).get("status", "gone") in ("stopped", "gone") or not Path(d).exists() for d in dirs), msgs
    for d in dirs:
        tab_train.delete(d)
        assert not Path(d).exists()
    # merges: two at once on one run are one merge; a delete meanwhile is refused
    run_dir = workspace.runs_dir() / f"merge-{time.time_ns()}"
    done = lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(run_dir), "--set", "training.max_steps=3",
                      "--set", "training.sample_every=0", "--set", "data.eval_split=0", check=True)
    assert done.returncode == 0
    results, deleted = [], []
    threads = [threading.Thread(target=lambda: results.append(tab_convert.convert_api(str(run_dir), "final", "merge",
                                                                                      "auto"))) for _ in range(2)]
    [t.start() for t in threads]
    assert wait_for(lambda: events(run_dir, "convert_start"), timeout=60)
    deleted.append(tab_train.delete(str(run_dir)))
    [t.join() for t in threads]
    ok = [r for r in results if r.get("ok")]
    assert len(ok) == 1, results
    assert any("in use" in (r.get("error") or "") or "exists" in (r.get("error") or "") for r in results), results
    assert "in use" in deleted[0] or "deleted" in deleted[0]
    if run_dir.exists():
        assert (run_dir / "merged" / "verification.json").exists()


# ---------------------------------------------------------------- warnings: days, host RAM

def test_start_warns_when_a_run_would_take_days_or_not_fit_the_ram():
    from lorastudio.core import estimate

    days = config.from_dict({"model": {"name_or_path": "Qwen/Qwen2.5-7B-Instruct"}, "method": "qlora",
                             "training": {"max_steps": 1_000_000, "device": "cuda"}})
    assert any("days" in w for w in estimate.start_warnings(days))
    ram = config.from_dict({"model": {"name_or_path": "meta-llama/Llama-3.1-8B-Instruct"}, "method": "full",
                            "training": {"device": "cpu"}})
    assert any("GiB of RAM" in w for w in estimate.start_warnings(ram))
    assert estimate.start_warnings(config.from_dict({})) == []  # the embedded model: nothing to say


@pytest.mark.slow
def test_a_run_warns_once_its_measured_eta_passes_a_day(tmp_path):
    from lorastudio.webui.train_view import status_markdown

    run_dir = workspace.runs_dir() / f"eta-{time.time_ns()}"
    out = lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(run_dir), "--detach",
                     "--set", "training.max_steps=10000000", "--set", "training.sample_every=0",
                     "--set", "data.eval_split=0", "--set", "training.save_steps=10000000")
    assert out.returncode == 0, out.stderr
    try:
        assert wait_for(lambda: events(run_dir, "warning"), timeout=120)
        assert "more days" in events(run_dir, "warning")[0]["message"]
        from lorastudio.webui.train_view import run_view

        assert "more days" in status_markdown(run_view(str(run_dir)))
    finally:
        runs.stop(run_dir, grace=20)
