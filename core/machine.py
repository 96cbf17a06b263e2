"""What this machine has, read without importing torch (the web app never loads it), and the
resource limits a child process puts on itself.

    gpu_count()            CUDA GPUs visible to a new process (CUDA_VISIBLE_DEVICES honoured)
    gpus_problem(n, dev)   why n training processes cannot start here (None when they can)
    limit_memory(kind)     RLIMIT_AS for this process, so a runaway child fails alone
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

# Several CPU processes (gloo) exist to test multi-GPU runs without a GPU: a handful is plenty,
# and each is a full copy of the model in RAM.
CPU_MAX_PROCESSES = 4


@functools.lru_cache(maxsize=1)
def _physical_gpus() -> int:
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return sum(1 for _ in proc.iterdir())
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def gpu_count() -> int:
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            return torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # noqa: BLE001 - a broken driver: no usable GPU
            return 0
    n = _physical_gpus()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = []
        for v in visible.split(","):  # CUDA stops at the first invalid entry ("-1" hides them all)
            v = v.strip()
            if not v or v.startswith("-"):
                break
            entries.append(v)
        n = min(n, len(entries))
    return n


def device_for(requested: str = "auto") -> str:
    return "cuda" if requested == "cuda" or (requested == "auto" and gpu_count() > 0) else "cpu"


def gpus_problem(gpus: int, requested_device: str = "auto") -> str | None:
    """A sentence naming training.gpus when GPUS processes cannot run on this machine."""
    if device_for(requested_device) == "cpu":
        if gpus > CPU_MAX_PROCESSES:
            return (f"training.gpus: {gpus} processes on CPU; at most {CPU_MAX_PROCESSES} (several CPU processes "
                    "are for testing multi-GPU runs; this machine has no CUDA GPU)")
        return None
    n = gpu_count()
    if gpus > n:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (f"training.gpus: {gpus} requested but only {n} CUDA GPU(s) are visible"
                + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""))
    return None


def deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


# What a child may map (RLIMIT_AS), as a share of the machine's RAM: a worker rendering and
# tokenising for the web app, a training or convert job on CPU. Above it the child gets a
# MemoryError (or dies) on its own; the web server and other jobs are untouched.
SHARE = {"worker": 0.4, "cpu_job": 0.8}
MIN_BYTES = {"worker": 3 * 2**30, "cpu_job": 4 * 2**30}
ENV = {"worker": "LORASTUDIO_WORKER_MEM_MB", "cpu_job": "LORASTUDIO_JOB_MEM_MB"}  # override the share


def memory_limit(kind: str) -> int:
    if os.environ.get(ENV[kind]):
        return int(float(os.environ[ENV[kind]]) * 2**20)
    ram = total_ram()
    return max(MIN_BYTES[kind], int(SHARE[kind] * ram)) if ram else 0


def limit_memory(kind: str) -> int:
    """Cap this process's address space (Linux; children inherit it) and make it the OOM
    killer's first choice over the web server. Returns the limit in bytes (0: none)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("500")
    except OSError:
        pass
    limit = memory_limit(kind)
    if not limit:
        return 0
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        return 0
    return limit
