"""Issue 5 through the web app: a server killed mid-run re-attaches with the whole curve; the
bad-input table gives readable messages in the UI too, and the server stays up; launch refuses
to expose the app without credentials."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_bad_input import DATA_CASES, TEMPLATE_CASES, _model_dirs, _write, jl, GOOD
from test_webui_handlers import START_NAMES, TOKEN, start_app, stop_app

# every test here starts training children or a server (the quick suite leaves them out)
pytestmark = pytest.mark.slow


def client_for(url):
    from gradio_client import Client

    return Client(url, verbose=False, headers={"Authorization": f"Bearer {TOKEN}"})


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    url, proc = start_app(tmp_path_factory.mktemp("app") / "app.log")
    yield url, client_for(url)
    stop_app(proc)


def test_server_killed_mid_run_reattaches_with_full_curve(tmp_path):
    url, proc = start_app(tmp_path / "a.log")
    client = client_for(url)
    form = dict(zip(START_NAMES, client.predict("tiny_smoke", api_name="/load_preset")))
    form.update(max_steps=100000, sample_every=0, eval_split=0, save_steps=50, run_name=f"restart-{time.time_ns()}")
    run_dir, md, _cmd = client.predict(preset="tiny_smoke", **form, api_name="/start")
    assert run_dir, md
    deadline = time.time() + 90
    while time.time() < deadline and len(client.predict(run_dir, api_name="/run_status").get("loss") or []) < 5:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the server dies hard; the run is in its own process group
    proc.wait(10)
    from lorastudio.core import runs

    seen_dead = max(e["step"] for e in runs.read_events(run_dir)[0] if e["event"] == "step")
    time.sleep(2)
    assert runs.status(run_dir)["status"] == "running"  # training never noticed

    url2, proc2 = start_app(tmp_path / "b.log")
    try:
        s = client_for(url2).predict(run_dir, api_name="/run_status")
        steps = [p[0] for p in s["loss"]]
        assert s["status"] == "running"
        assert steps == list(range(1, len(steps) + 1)) and len(steps) > seen_dead  # complete, still growing
        assert "stopped" in client_for(url2).predict(run_dir, api_name="/stop")
    finally:
        stop_app(proc2)
        runs.stop(run_dir, grace=10)


ROW_SUMMARY = ("used", "skipped")  # summary phrases: checked as numbers below


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_data_cases_in_the_ui(app, tmp_path, case):
    _url, client = app
    _id, name, content, code, words = case
    path = _write(tmp_path, name, content)
    s = client.predict("builtin:tiny", str(path), "auto", "", "auto", "", 128, False, api_name="/dataset_stats")
    blob = json.dumps(s, ensure_ascii=False)
    if code == 2:
        assert s.get("error"), s
        assert "Traceback" not in s["error"]
    else:
        assert not s.get("error"), s
    for w in words:
        if w.split(" ")[-1] in ROW_SUMMARY and w.split(" ")[0].isdigit():
            n, what = w.split(" ")
            assert s[f"rows_{what}"] == int(n), (w, s)
        else:
            assert w in blob, (w, blob[:1000])


def test_model_cases_in_the_ui(app, tmp_path):
    _url, client = app
    dirs = _model_dirs(tmp_path)
    _info, md = client.predict(str(dirs["missing"]), False, api_name="/model_info")
    assert md.startswith("**Error:**") and str(dirs["missing"]) in md and "Traceback" not in md
    _info, md = client.predict(str(dirs["not-a-model"]), False, api_name="/model_info")
    assert md.startswith("**Error:**") and "model folder" in md
    # the Model tab only reads config.json (no code runs) and warns; loading it is refused
    info, md = client.predict(str(dirs["remote-code"]), False, api_name="/model_info")
    assert "trust_remote_code" in md
    data = _write(tmp_path, "d.jsonl", jl(GOOD))
    s = client.predict(str(dirs["remote-code"]), str(data), "auto", "", "auto", "", 128, False,
                       api_name="/dataset_stats")
    assert "trust_remote_code" in s["error"]


@pytest.mark.parametrize("case", TEMPLATE_CASES, ids=[c[0] for c in TEMPLATE_CASES])
def test_template_cases_in_the_ui(app, case):
    _url, client = app
    _id, source, words = case
    pieces, md = client.predict("builtin:tiny", "custom", source, False, "", "auto", 0, False, api_name="/template")
    assert pieces == [] and md.startswith("**Error:**") and "Traceback" not in md
    for w in words:
        assert w.lower() in md.lower(), (w, md)


def test_server_is_still_up_after_the_bad_input(app):
    _url, client = app
    s = client.predict("builtin:tiny", "builtin:sample", "auto", "", "auto", "", 128, False, api_name="/dataset_stats")
    assert s["rows_used"] >= 100 and not s.get("error")  # the bundled sample, analysed as before


@pytest.mark.parametrize("args, words", [
    (["--share"], "--share exposes the app beyond this machine: it requires --auth USER:PASSWORD"),
    (["--host", "0.0.0.0"], "--host 0.0.0.0 exposes the app beyond this machine"),
    (["--auth", "nopassword"], "--auth expects USER:PASSWORD"),
])
def test_exposing_the_app_needs_credentials(args, words):
    out = subprocess.run([sys.executable, "-m", "lorastudio.cli", "webui", "--port", "1", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and words in out.stderr


def test_login_with_credentials(tmp_path):
    from gradio_client import Client
    from test_webui_handlers import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lorastudio.cli", "webui", "--port", str(port), "--auth", "ann:s3cret"],
                            cwd=ROOT, stdout=open(tmp_path / "log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                client = Client(url, auth=("ann", "s3cret"), verbose=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        else:
            pytest.fail((tmp_path / "log").read_text()[-2000:])
        info, _md = client.predict("builtin:tiny", False, api_name="/model_info")
        assert info["architecture"] == "LlamaForCausalLM"
        with pytest.raises(Exception):
            Client(url, auth=("ann", "wrong"), verbose=False)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


def test_uploads_are_size_limited(tmp_path):
    """--max-upload-mb: a bigger file is refused by the server; a small one is copied into the workspace."""
    from gradio_client import handle_file

    from test_webui_handlers import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lorastudio.cli", "webui", "--port", str(port), "--max-upload-mb", "1"],
                            cwd=ROOT, stdout=open(tmp_path / "log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "LORASTUDIO_TOKEN": TOKEN})
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 90
        while True:
            try:
                client = client_for(url)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline:
                    pytest.fail((tmp_path / "log").read_text()[-2000:])
                time.sleep(0.5)
        row = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
        small = tmp_path / "small.jsonl"
        small.write_text(row + "\n")
        path, md = client.predict(handle_file(str(small)), "builtin:sample", api_name="/upload")
        assert "uploaded" in md
        big = tmp_path / "big.jsonl"
        big.write_text((row + "\n") * (2 * 1024 * 1024 // len(row)))
        with pytest.raises(Exception) as e:
            client.predict(handle_file(str(big)), "builtin:sample", api_name="/upload")
        assert "413" in str(e.value) or "size" in str(e.value).lower() or "large" in str(e.value).lower()
        # and the server is still answering
        assert client.predict("builtin:tiny", False, api_name="/model_info")[0]["architecture"] == "LlamaForCausalLM"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
