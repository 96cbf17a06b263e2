"""No request can take the server down or reach beyond its own runs: one test per defect an attack
on localhost found (with the access token, which any page viewer holds), through the running
app's API, each checking afterwards that the server answers within a second and that nothing
outside the workspace changed; the CLI too where it applies.

The server here has a workspace of its own (HOME), is started in its own folder (LAUNCH, which
it may read) and may also read OUTSIDE (--allow-dir): the attacker's files live there."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, wait_for
from test_webui_handlers import START_NAMES, TOKEN, free_port

WORKER_TIMEOUT_S = 8  # the server's per-request limit here (default: 60 s for a template)
WORKER_MEM_MB = 3000  # its worker's address space (a warm worker maps ~2.3 GiB)


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    home: Path
    launch: Path
    outside: Path
    client: object
    env: dict


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False, headers={"Authorization": f"Bearer {TOKEN}"})


def app_processes(home: Path) -> list[psutil.Process]:
    """Every live process of that workspace (the server's children: workers, training, convert)."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("LORASTUDIO_HOME") == str(home) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    home, launch, outside = root / "home", root / "launch", root / "outside"
    for d in (home, launch, outside):
        d.mkdir()
    env = {**os.environ, "LORASTUDIO_HOME": str(home), "LORASTUDIO_TOKEN": TOKEN,
           "LORASTUDIO_WORKER_TIMEOUT_S": str(WORKER_TIMEOUT_S), "LORASTUDIO_WORKER_MEM_MB": str(WORKER_MEM_MB)}
    env.pop("LORASTUDIO_ALLOW_DIRS", None)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lorastudio.cli", "webui", "--port", str(port), "--allow-dir", str(outside)],
                            cwd=launch, env=env, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            client = _client(url)
            break
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail((root / "server.log").read_text()[-3000:])
            time.sleep(0.5)
    yield Server(url, proc, home, launch, outside, client, env)
    for p in app_processes(home):  # runs and workers a failed test left behind, then the server
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    os.killpg(proc.pid, signal.SIGKILL)


# every test here that uses `server` is also checked by this: up, and nothing outside changed
@pytest.fixture(autouse=True)
def _up_and_nothing_changed_outside(request):
    """After every test of the server: it answers within a second, and every file outside its
    workspace (the launch folder, the --allow-dir folder) is as it was before the test."""
    if "server" not in request.fixturenames:
        yield
        return
    s = request.getfixturevalue("server")
    before = snapshot(s.launch, s.outside)
    yield
    responsive(s)
    assert snapshot(s.launch, s.outside) == before


def snapshot(*roots: Path) -> dict:
    """Every file under ROOTS: size, mtime and content hash (what 'nothing changed' compares)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_symlink() or not p.is_file():
                out[str(p)] = ("special",)
                continue
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def responsive(s: Server, within: float = 1.0) -> None:
    """The server is up and answers an API call within WITHIN seconds."""
    assert s.proc.poll() is None, "the server died"
    t0 = time.time()
    r = s.client.predict("", api_name="/run_status")
    took = time.time() - t0
    assert r.get("status") == "" and took < within, (r, took)


def server_rss_mb(s: Server) -> float:
    return psutil.Process(s.proc.pid).memory_info().rss / 2**20


def cli(s: Server, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "lorastudio.cli", *args], cwd=s.launch, env=s.env, capture_output=True,
                          text=True, timeout=timeout)


def start_form(s: Server, **over) -> dict:
    form = dict(zip(START_NAMES, s.client.predict("tiny_smoke", api_name="/load_preset")))
    form.update(over)
    return form


def start(s: Server, **over):
    """/start with the tiny_smoke form and OVER -> (run_dir, status md). A refusal by Gradio's own
    input checks (a Number's minimum, say) comes back as ("", its message)."""
    try:
        run_dir, md, _cmd = s.client.predict(preset="tiny_smoke", **start_form(s, **over), api_name="/start")
    except Exception as e:  # noqa: BLE001 - gradio_client raises the server's validation error
        return "", f"**Error:** {e}"
    return (run_dir if isinstance(run_dir, str) else ""), md  # a refusal leaves the Run box as it was


def run_dirs(s: Server) -> set[str]:
    runs = s.home / "runs"
    return {p.name for p in runs.iterdir()} if runs.exists() else set()


# ---------------------------------------------------------------- 1. one template request killed the server

@pytest.mark.slow
def test_a_template_that_grows_is_stopped_and_the_server_stays_up(server):
    s = server
    before = snapshot(s.launch, s.outside)
    pieces, md = s.client.predict("builtin:tiny", "custom", "{{ 'A'*10**9 }}", False, "", "auto", 0, False,
                                  api_name="/template")
    assert pieces == [] and md.startswith("**Error:**") and "stopped" in md and "1,000,000,000" in md, md
    responsive(s)
    assert server_rss_mb(s) < 1000
    assert snapshot(s.launch, s.outside) == before


@pytest.mark.slow
def test_a_template_past_the_sandbox_is_stopped_by_the_worker_time_limit(server):
    """`sum` of 300,000 one-item lists is quadratic inside one C call (each addition copies the
    total so far), where the sandbox counts no step: the worker's time limit stops it; meanwhile
    the server answers and another render goes to the other worker."""
    s = server
    result = {}

    def bomb():
        t0 = time.time()
        result["out"] = s.client.predict("builtin:tiny", "custom", "{{ ([[1]] * 300000)|sum(start=[])|length }}", False, "", "auto",
                                         0, False, api_name="/template")
        result["took"] = time.time() - t0

    t = threading.Thread(target=bomb)
    t.start()
    time.sleep(2)
    assert t.is_alive()
    responsive(s)
    pieces, md = s.client.predict("builtin:tiny", "chatml", "", False, "", "auto", 0, False, api_name="/template")
    assert pieces and "Template **chatml**" in md  # served while the bomb runs
    t.join(120)
    pieces, md = result["out"]
    assert pieces == [] and f"stopped after {WORKER_TIMEOUT_S} s" in md, md
    assert result["took"] < WORKER_TIMEOUT_S + 30
    responsive(s)
    pieces, md = s.client.predict("builtin:tiny", "auto", "", False, "", "auto", 0, False, api_name="/template")
    assert pieces  # a fresh worker took over


@pytest.mark.slow
def test_a_data_file_that_fills_the_memory_stops_the_worker_alone(server):
    s = server
    big = s.outside / "big.txt"
    with open(big, "w") as f:
        line = "word " * 200 + "\n"
        for _ in range(400 * 2**20 // len(line)):
            f.write(line)
    try:
        rss = server_rss_mb(s)
        out = s.client.predict("builtin:tiny", str(big), "auto", "", "auto", "", 128, False, api_name="/dataset_stats")
        assert "memory" in out.get("error", ""), out
        responsive(s)
        assert server_rss_mb(s) < rss + 200
        stats = s.client.predict("builtin:tiny", "builtin:sample", "auto", "", "auto", "", 128, False,
                                 api_name="/dataset_stats")
        assert stats.get("rows_used", 0) >= 200, stats  # the next request gets a fresh worker
    finally:
        big.unlink()


# ---------------------------------------------------------------- 2. reading a status killed any process group

def test_a_crafted_run_json_signals_nothing_and_changes_nothing(server):
    s = server
    victim = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        evil = s.launch / "evil-run"
        evil.mkdir()
        (evil / "run.json").write_text(json.dumps({"status": "running", "pid": 999999, "pgid": victim.pid}))
        (evil / "config.yaml").write_text("model:\n  name_or_path: builtin:tiny\n  trust_remote_code: true\n")
        # the same claims inside the workspace (a forged or corrupted run), with the victim's own pid
        forged = s.home / "runs" / "forged"
        forged.mkdir(parents=True)
        (forged / "run.json").write_text(json.dumps({"status": "running", "pid": victim.pid, "pgid": victim.pid}))
        forged_bytes = (forged / "run.json").read_bytes()
        before = snapshot(s.launch, s.outside)

        st = s.client.predict(str(evil), api_name="/run_status")
        assert "not a run of this workspace" in st["error"], st
        for api in ("/stop", "/resume", "/delete_run"):
            md = s.client.predict(str(evil), api_name=api)
            assert md.startswith("**Error:**") and "not a run of this workspace" in md, (api, md)
        assert "not a run of this workspace" in s.client.predict(str(evil), api_name="/retry")["message"]
        assert "not a run of this workspace" in s.client.predict(str(evil), "final", "merge", "auto",
                                                                 api_name="/convert_run")["error"]
        reply = s.client.predict("hi", str(evil), "final", "fine-tuned", "", 0, 1, 8, True, api_name="/chat_once")
        assert "not a run of this workspace" in reply["error"]

        st = s.client.predict(str(forged), api_name="/run_status")
        assert st["status"] == "failed"  # a claim with no process of ours behind it
        assert "stop: **failed**" in s.client.predict(str(forged), api_name="/stop")

        assert victim.poll() is None
        assert (forged / "run.json").read_bytes() == forged_bytes  # status is a read; stop signalled nothing
        # the CLI: the same claims, the same answer
        out = cli(s, "stop", str(evil))
        assert out.returncode == 1 and "nothing to stop" in out.stderr
        out = cli(s, "stop", str(forged))
        assert out.returncode == 1 and "nothing to stop" in out.stderr
        out = cli(s, "runs")
        assert out.returncode == 0 and "forged" in out.stdout
        assert victim.poll() is None
        assert (forged / "run.json").read_bytes() == forged_bytes
        assert snapshot(s.launch, s.outside) == before
        responsive(s)
    finally:
        victim.kill()
        import shutil

        shutil.rmtree(s.home / "runs" / "forged", ignore_errors=True)
        shutil.rmtree(s.launch / "evil-run", ignore_errors=True)  # the attacker's files, gone again


# ---------------------------------------------------------------- 3. gpus had no bound

def test_more_processes_than_the_machine_has_are_refused_before_anything_starts(server):
    s = server
    dirs = run_dirs(s)
    before = snapshot(s.launch, s.outside)
    run_dir, md = start(s, gpus=1000, run_name="thousand")
    assert run_dir == "" and "training.gpus: 1000 processes on CPU; at most 4" in md, md
    assert run_dirs(s) == dirs
    assert not [p for p in app_processes(s.home) if "accelerate" in " ".join(p.cmdline())]
    responsive(s)
    out = cli(s, "train", str(ROOT / "presets" / "tiny_smoke.yaml"), "--gpus", "1000", "--detach")
    assert out.returncode == 2 and "at most 4" in out.stderr, out.stderr
    assert run_dirs(s) == dirs
    assert snapshot(s.launch, s.outside) == before


# ---------------------------------------------------------------- 4. no upper bounds where a typo costs a machine

@pytest.mark.parametrize("field, value, words", [
    ("epochs", 1e12, "training.epochs"),
    ("cutoff", 1e9, "template.cutoff_len"),
    ("lora_r", 1e6, "lora.r"),
    ("max_steps", 1e12, "training.max_steps"),
    ("micro_batch_size", 1e9, "micro"),
    ("grad_accum", 1e9, "grad"),
    ("learning_rate", 1e9, "training.learning_rate"),
    ("lora_alpha", 1e300, "lora.alpha"),
    ("eval_steps", -5, "eval"),
    ("save_steps", 0, "save"),
    ("early_stopping", 1e9, "early"),
    ("gpu_memory", 1e12, "gpu_memory"),
])
def test_numbers_past_their_bounds_are_refused_with_the_field_named(server, field, value, words):
    s = server
    dirs = run_dirs(s)
    run_dir, md = start(s, **{field: value}, run_name=f"bound-{field}")
    assert run_dir == "" and md.startswith("**Error:**"), md
    assert words.lower() in md.lower(), md
    assert run_dirs(s) == dirs


def test_numbers_past_their_bounds_in_the_cli():
    from conftest import lorastudio

    for setting, words in (("training.epochs=1e12", "training.epochs"), ("template.cutoff_len=1000000000",
                           "template.cutoff_len"), ("lora.r=1000000", "lora.r"),
                           ("training.learning_rate=.nan", "finite number"), ("training.seed=-1", "training.seed")):
        out = lorastudio("train", "presets/tiny_smoke.yaml", "--set", setting, "--detach", timeout=120)
        assert out.returncode == 2 and words in out.stderr, (setting, out.stderr)


@pytest.mark.slow
def test_epochs_times_rows_past_the_step_bound_fails_with_a_message(server):
    """Each bound alone is fine; the product is checked by the run once the data is known."""
    s = server
    run_dir, md = start(s, data="builtin:sample | 1000", epochs=1000, max_steps=-1, micro_batch_size=1, grad_accum=1,
                        run_name="too-many-steps")
    assert run_dir, md
    assert wait_for(lambda: s.client.predict(run_dir, api_name="/run_status")["status"] == "failed", timeout=120)
    st = s.client.predict(run_dir, api_name="/run_status")
    assert "steps; at most 10,000,000" in st["error"] and "training.epochs" in st["error"], st
    responsive(s)


# ---------------------------------------------------------------- 5. unlimited concurrent training on CPU

@pytest.mark.slow
def test_ten_starts_run_one_at_a_time_and_stop_ends_them_all(server):
    s = server
    dirs = []
    t0 = time.time()
    for i in range(10):
        run_dir, md = start(s, max_steps=100000, save_steps=100000, sample_every=0, eval_split=0, run_name=f"q{i}")
        assert run_dir, md
        dirs.append(run_dir)
    assert time.time() - t0 < 30

    def states():
        return [s.client.predict(d, api_name="/run_status") for d in dirs]

    assert wait_for(lambda: sum(v["status"] == "queued" for v in states()) == 9
                    and sum(v["status"] in ("starting", "running") for v in states()) == 1, timeout=120), \
        [v["status"] for v in states()]
    queued = [v for v in states() if v["status"] == "queued"]
    assert sorted(int(v["queue_position"]) for v in queued) == list(range(1, 10))
    assert "queued: position" in queued[0]["status_md"]
    children = [p for p in app_processes(s.home) if "lorastudio.core.train" in " ".join(p.cmdline())]
    assert len(children) == 10
    waiting = sorted(p.memory_info().rss for p in children)[:9]
    assert max(waiting) < 200 * 2**20  # a queued run waits before importing torch
    responsive(s)
    for d in dirs:
        assert "stop: **stopped**" in s.client.predict(d, api_name="/stop")
    assert wait_for(lambda: not [p for p in app_processes(s.home) if "lorastudio.core.train" in " ".join(p.cmdline())],
                    timeout=30)
    responsive(s)


@pytest.mark.slow
def test_exclusive_false_opts_out_of_the_queue(tmp_path):
    """training.exclusive: false runs beside another run on the same device."""
    from conftest import events, lorastudio
    from lorastudio.core import runs

    a, b = tmp_path / "a", tmp_path / "b"
    sets = ["--set", "training.max_steps=100000", "--set", "training.sample_every=0", "--set", "data.eval_split=0"]
    assert lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(a), "--detach", *sets).returncode == 0
    assert lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(b), "--detach", *sets,
                      "--set", "training.exclusive=false").returncode == 0
    try:
        assert wait_for(lambda: events(a, "step") and events(b, "step"), timeout=180)
        assert not events(b, "queued")
    finally:
        runs.stop(a, grace=20), runs.stop(b, grace=20)


# ---------------------------------------------------------------- 6. the low ones

def test_the_token_check_has_no_suffix_hole(server):
    s = server
    for path in ("x/gradio_api/startup-events", "gradio_api/startup-events/", "a/b/gradio_api/startup-events"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(s.url + path, timeout=5)
        assert e.value.code == 401, path
    responsive(s)


@pytest.mark.slow
def test_a_fifo_or_device_as_dataset_gets_a_clear_message(server):
    s = server
    fifo = s.outside / "data.jsonl"
    os.mkfifo(fifo)
    try:
        out = s.client.predict("builtin:tiny", str(fifo), "auto", "", "auto", "", 128, False, api_name="/dataset_stats")
        assert "named pipe (FIFO)" in out["error"], out
        pieces, md = s.client.predict("builtin:tiny", "auto", "", True, str(fifo), "auto", 0, False, api_name="/template")
        assert "named pipe (FIFO)" in md, md
        run_dir, md = start(s, data=str(fifo), run_name="fifo")
        assert run_dir, md  # the path is fine; the child refuses the file with the same sentence
        assert wait_for(lambda: s.client.predict(run_dir, api_name="/run_status")["status"] == "failed", timeout=60)
        assert "named pipe (FIFO)" in s.client.predict(run_dir, api_name="/run_status")["error"]
    finally:
        fifo.unlink()
    out = s.client.predict("builtin:tiny", "/dev/zero", "auto", "", "auto", "", 128, False, api_name="/dataset_stats")
    assert "outside the folders" in out["error"]  # not an allowed folder in the first place
    responsive(s)


def test_config_values_are_what_they_claim_to_be(server):
    s = server
    dirs = run_dirs(s)
    run_dir, md = start(s, lora_targets="q_proj\nmethod: full", run_name="inject")
    assert run_dir == "" and "lora.target_modules" in md and "not a module name" in md, md
    run_dir, md = start(s, lora_targets="q_proj, v_proj; rm -rf", run_name="inject2")
    assert run_dir == "" and "lora.target_modules" in md, md
    run_dir, md = start(s, run_name="two\nlines")
    assert run_dir == "" and "output.run_name" in md, md
    assert run_dirs(s) == dirs
    responsive(s)
