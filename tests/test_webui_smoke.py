"""The app launches offline on 127.0.0.1 and its preview API answers (gradio_client)."""

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("app") / "app.log", "w")
    # --no-auth mode (LORASTUDIO_NO_AUTH=1); tmp files readable (LORASTUDIO_ALLOW_DIRS)
    proc = subprocess.Popen([sys.executable, "-m", "lorastudio.cli", "webui", "--port", str(port)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "LORASTUDIO_NO_AUTH": "1", "LORASTUDIO_ALLOW_DIRS": "/tmp"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("app did not start")
    yield url
    os.killpg(proc.pid, 9)


@pytest.mark.slow
def test_preview_api_highlights_trained_tokens(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    pieces, status = client.predict("builtin:tiny", "builtin:sample", "auto", 2, api_name="/preview")
    assert "2 samples" in status
    trained = [p["token"] for p in pieces if p["class_or_confidence"] == "trained"]
    assert trained and all(t.endswith("<|im_end|>") for t in trained)


def test_bad_input_is_a_message_and_the_server_stays_up(app_url, tmp_path):
    from gradio_client import Client

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json at all\n")
    client = Client(app_url, verbose=False)
    pieces, status = client.predict("builtin:tiny", str(bad), "auto", 2, api_name="/preview")
    assert pieces == [] and status.startswith("**Error:**") and "bad.jsonl" in status
    assert "Traceback" not in status
    pieces, status = client.predict("builtin:tiny", "builtin:sample", "auto", 1, api_name="/preview")
    assert "1 samples" in status
