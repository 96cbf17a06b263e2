"""The training child's plumbing: SIGTERM becomes a Stop at the next step, run.json and
metrics.jsonl are written by rank 0 only, train.log lines, the device queue, and the sentence an
error becomes (exit codes in core.runs: 0 done, 1 failed, 2 config or input error, 3 stopped)."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

from . import distributed, runs

STOP = {"requested": False, "in_training": False, "writing": 0, "no_raise": False}


class StopRequested(BaseException):
    """SIGTERM before training: a BaseException, like KeyboardInterrupt, so that no library's
    `except Exception` (an import, a tokenizer load) turns a Stop into a failure."""


def on_sigterm(signum, frame):
    STOP["requested"] = True
    print(f"[lorastudio] received signal {signum}: stopping at the next step", flush=True)
    if not (STOP["in_training"] or STOP["writing"] or STOP["no_raise"]):
        raise StopRequested()


class Writing:
    """No StopRequested inside a run.json/metrics.jsonl write (it would leave run.json's lock
    held); raised right after instead."""

    def __enter__(self):
        STOP["writing"] += 1

    def __exit__(self, *exc):
        STOP["writing"] -= 1
        if STOP["requested"] and exc[0] is None and not (STOP["writing"] or STOP["in_training"] or STOP["no_raise"]):
            raise StopRequested()


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("lorastudio", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def log(msg: str, all_ranks: bool = False) -> None:
    if not (all_ranks or distributed.is_main()):
        return  # one train.log for N ranks: rank 0 speaks for the run
    rank = f" rank {distributed.rank()}" if distributed.is_distributed() and all_ranks else ""
    print(f"[lorastudio {time.strftime('%H:%M:%S')}{rank}] {msg}", flush=True)


def write_json(run_dir, **updates) -> None:
    """run.json: written by rank 0 only (every process when not distributed)."""
    if distributed.is_main():
        with Writing():
            runs.write_json(run_dir, **updates)


def event(run_dir, event: str, **fields) -> None:
    """metrics.jsonl: rank 0 only, so each step is recorded once."""
    if distributed.is_main():
        with Writing():
            runs.append_event(run_dir, event, **fields)


# the libraries' own switches for their progress bars, set before they are imported (each reads
# its variable at import; a value the user set is kept)
NO_PROGRESS_BARS = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                    "TQDM_DISABLE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def quiet_libraries(log_file: str | os.PathLike | None = None) -> None:
    """Keep what people read free of library chatter; call it first thing in every child (training,
    convert, chat and analysis workers) and in the CLI chat. No progress bars (huggingface_hub,
    transformers, datasets, tqdm). Each library warning (Python's warnings, transformers' log)
    becomes one "[library] ..." line of the log: the child's own log (its stderr), or log_file
    where stderr is the user's terminal (the CLI chat). bitsandbytes' notice that its optional
    CPU kernels are missing is dropped: it advises `pip install kernels`, which nothing here needs
    (its errors still show)."""
    import logging
    import warnings

    for key, value in NO_PROGRESS_BARS.items():
        os.environ.setdefault(key, value)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # buffered per line: the log is read while the process runs
    stream = open(log_file, "a", buffering=1, encoding="utf-8") if log_file is not None else sys.stderr  # noqa: SIM115

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:
        # warnings.showwarning: the message on one line, without the source line Python adds
        print(f"[library] {category.__name__}: {' '.join(str(message).split())}", file=stream, flush=True)

    warnings.showwarning = one_line
    from transformers.utils import logging as hf_logging

    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[library] %(name)s: %(message)s"))
    hf_logging.disable_default_handler()
    hf_logging.add_handler(handler)
    for name in ("huggingface_hub.utils", "transformers.utils.logging", "datasets.utils.tqdm"):
        module = sys.modules.get(name)  # already imported: switch its bars off too
        if module is not None:
            (getattr(module, "disable_progress_bars", None) or module.disable_progress_bar)()


def take_device(cfg, device: str, run_dir: Path) -> list:
    """Wait (visibly) for the device lock of every card the job uses (training.gpus of them, in
    index order; cpu.lock on CPU), or refuse at once when training.queue is false. Taken by rank 0
    only, before torch is imported."""
    t = cfg.training
    taken = []
    for lock in distributed.device_locks(device, t.gpus, "training", run_dir):
        def on_wait(position, holder, lock=lock):
            who = (holder or {}).get("run_dir") or (holder or {}).get("job", "another job")
            write_json(run_dir, status="queued", queue_position=position, queue_device=lock.key, queue_holder=who)
            event(run_dir, "queued", position=position, device=lock.key, holder=who)
            log(f"waiting for {lock.key}: position {position} in the queue (held by {who})")

        lock.acquire(wait=t.queue, on_wait=on_wait)
        taken.append(lock)
    write_json(run_dir, status="starting", queue_position=None, devices=[lk.key for lk in taken])
    return taken


def model_revision(cfg) -> str | None:
    from . import model as model_lib

    path = Path(model_lib.resolve_path(cfg.model.name_or_path))
    if cfg.model.revision:
        return cfg.model.revision
    if path.is_dir():  # a local folder has no commit: fingerprint its config instead
        import hashlib

        cfgf = path / "config.json"
        return "local:" + hashlib.sha256(cfgf.read_bytes()).hexdigest()[:12] if cfgf.exists() else "local"
    return None


DISK_FULL = (28, 122, 27)  # ENOSPC, EDQUOT, EFBIG


def explain(e: Exception, run_dir: Path) -> str:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, torch.OutOfMemoryError):
        return ("out of GPU memory: lower training.micro_batch_size (raise grad_accum to keep the effective "
                "batch) or template.cutoff_len, or use method: qlora. Retry with half the micro-batch and the "
                "same effective batch: lorastudio retry " + str(run_dir))
    if isinstance(e, MemoryError) or "can't allocate memory" in str(e):
        from . import machine

        limit = machine.memory_limit("cpu_job")
        return (f"out of host memory ({type(e).__name__}; this run may use {limit / 2**30:.1f} GiB, "
                f"{machine.ENV['cpu_job']} changes that): lower training.micro_batch_size or template.cutoff_len")
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        good = runs.last_checkpoint(run_dir)
        return (f"disk full while writing under {run_dir} ({e.strerror}); free some space, then "
                + (f"`lorastudio resume {run_dir}` continues from {good.name}, which is intact"
                   if good else "start again (no complete checkpoint yet)"))
    return f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)


def discard_partial_checkpoints(run_dir: Path) -> None:
    """A save cut short leaves a checkpoint without trainer_state.json: remove it."""
    import shutil

    for cp in runs.checkpoints(run_dir):
        if not cp.complete:
            shutil.rmtree(cp.path, ignore_errors=True)
            log(f"removed incomplete {cp.path.name}")
