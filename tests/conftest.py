"""Shared test helpers."""

import os
from pathlib import Path

import pytest

# ../shared/assets next to the repo checkout: real data files and models the tests read.
SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets"


def shared_assets() -> Path:
    """Path to ../shared/assets. Missing: skip locally, but FAIL under CI=true (CI must have it)."""
    if SHARED.is_dir():
        return SHARED
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{SHARED} is missing (required when CI=true)")
    pytest.skip(f"{SHARED} not present")


@pytest.fixture
def shared_dir() -> Path:
    return shared_assets()


# ---------------------------------------------------------------- environment for every test
# Offline, single-threaded (2-core machines are 5-12x faster this way under load), and a
# throwaway workspace unless the caller chose one (.ci/run sets LORASTUDIO_HOME).
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

for _k, _v in {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "GRADIO_ANALYTICS_ENABLED": "False"}.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("LORASTUDIO_HOME", tempfile.mkdtemp(prefix="lorastudio-test-"))

ROOT = Path(__file__).resolve().parents[1]


def lorastudio(*args: str, timeout: float = 600, check: bool = False, env: dict | None = None):
    """Run the real CLI in a subprocess (the way users and the UI do)."""
    proc = subprocess.run([sys.executable, "-m", "lorastudio.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"lorastudio {' '.join(args)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _workspace_run(name: str) -> Path:
    """A run folder in the session's workspace: the web app reads and acts on those runs only."""
    import time

    return Path(os.environ["LORASTUDIO_HOME"]) / "runs" / f"{name}-{time.time_ns()}"


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One trained tiny_smoke run, shared by every test that only reads a finished run."""
    run_dir = _workspace_run("smoke")
    lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(run_dir), check=True)
    return run_dir


@pytest.fixture(scope="session")
def qlora_run(tmp_path_factory) -> Path:
    """One 4-step QLoRA NF4 run on CPU (bitsandbytes 0.50), shared by the training and merge tests."""
    pytest.importorskip("bitsandbytes")
    run_dir = _workspace_run("qlora")
    lorastudio("train", "presets/tiny_smoke.yaml", "--run-dir", str(run_dir), "--set", "method=qlora",
               "--set", "training.max_steps=4", "--set", "training.sample_every=0", "--set", "data.eval_split=0",
               check=True)
    return run_dir


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """One trained presets/tiny_demo.yaml run (~1 min on 2 cores), shared by persona/chat/merge tests."""
    run_dir = _workspace_run("demo")
    lorastudio("train", "presets/tiny_demo.yaml", "--run-dir", str(run_dir), check=True)
    return run_dir


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_children():
    """After the session, end any training/convert/chat child a failed test left behind (they run
    in their own process groups, so pytest would not reap them)."""
    yield
    import signal

    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if not any(m in cmd for m in ("lorastudio.core.train", "lorastudio.core.convert", "lorastudio.core.chat_worker")):
            continue
        try:  # only this session's children: they inherited our workspace
            if p.environ().get("LORASTUDIO_HOME") != os.environ["LORASTUDIO_HOME"]:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        try:
            os.killpg(os.getpgid(p.info["pid"]), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def copy_run(src: Path, name: str) -> Path:
    """A copy of a finished run in the workspace (config, run.json, metrics, final adapter): a test
    that writes merged/ or gguf-*/ into it leaves the shared fixture run as other tests expect it."""
    import shutil

    dst = _workspace_run(name)
    dst.mkdir(parents=True)
    for f in ("config.yaml", "run.json", "metrics.jsonl", "train.log"):
        if (src / f).exists():
            shutil.copyfile(src / f, dst / f)
    shutil.copytree(src / "adapter", dst / "adapter")
    return dst


def events(run_dir, kind=None) -> list[dict]:
    """A run's metrics.jsonl events, optionally of one kind."""
    from lorastudio.core import runs

    evs, _ = runs.read_events(run_dir)
    return [e for e in evs if kind is None or e["event"] == kind]


def wait_for(cond, timeout=120, every=0.2) -> bool:
    """Poll cond() until it is true or the timeout passes (runs are real child processes)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(every)
    return False


# ---------------------------------------------------------------- markers (pyproject.toml declares them)
# slow: trains a model (itself or through a fixture), or starts children, servers or long workers;
# browser: drives chromium.
# `pytest -m "not slow and not browser"` is the quick suite (under 3 minutes on 2 cores).
TRAINING_FIXTURES = {"smoke_run", "qlora_run", "demo_run", "trained_run", "merged", "demo_chat"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name == "test_browser.py":
            item.add_marker(pytest.mark.browser)
        if TRAINING_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
