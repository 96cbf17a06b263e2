"""Recovering from a failed run: the one-click retry after CUDA out-of-memory.

The retry halves the micro-batch and multiplies gradient accumulation so the effective batch
(micro_batch_size x grad_accum) and therefore the optimisation stays the same."""

from __future__ import annotations

from pathlib import Path

from . import config as config_lib
from . import runs


def oom_retry_overrides(cfg) -> dict | None:
    """Checkpointing of every layer first when the run had it off or partial; else half the micro-batch. None when the
    micro-batch is already 1 (then the cutoff or QLoRA is the way out)."""
    t = cfg.training
    if t.device == "cuda" and (t.gradient_checkpointing is False or isinstance(t.checkpoint_layers, int)):
        return {"training.gradient_checkpointing": True, "training.checkpoint_layers": "all"}
    mb, ga = cfg.training.micro_batch_size, cfg.training.grad_accum
    if mb <= 1:
        return None
    new_mb = mb // 2
    return {"training.micro_batch_size": new_mb, "training.grad_accum": ga * mb // new_mb}


def retry(run_dir: str | Path, overrides: dict | None = None, launch: bool = True) -> Path:
    """A new run next to the failed one, same config with the retry overrides applied. Only a
    failed run is retried (a finished or stopped one is resumed or started anew)."""
    run_dir = Path(run_dir)
    status = runs.status(run_dir).get("status") if (run_dir / "run.json").exists() else None
    if status != "failed":
        raise runs.LaunchError(f"only a failed run can be retried ({run_dir.name} is {status or 'not a run'})")
    cfg = config_lib.load(run_dir / "config.yaml")
    overrides = overrides or runs.read_json(run_dir).get("retry") or oom_retry_overrides(cfg)
    if not overrides:
        raise config_lib.ConfigError("training.micro_batch_size: already 1; lower template.cutoff_len or use QLoRA")
    data = cfg.model_dump(mode="json")
    for key, value in overrides.items():
        config_lib.apply_override(data, f"{key}={value}")
    new_cfg = config_lib.from_dict(data, str(run_dir / "config.yaml"))
    new_dir = run_dir.with_name(run_dir.name + "-retry")
    i = 1
    while new_dir.exists():
        i += 1
        new_dir = run_dir.with_name(f"{run_dir.name}-retry{i}")
    return runs.create_run(new_cfg, source=str(run_dir / "config.yaml"), notes=(f"retry of {run_dir}: {overrides}",),
                           run_dir=new_dir, start=launch, retry_of=str(run_dir))
