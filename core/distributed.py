"""Multi-process training (training.gpus > 1) through `accelerate launch`.

    runs.launch -> python -m accelerate.commands.launch --config_file RUN_DIR/accelerate.yaml
                   --num_processes N --main_process_port 0 -m lorastudio.core.train RUN_DIR [--resume]

The accelerate config (and, for ZeRO, RUN_DIR/deepspeed.json) is generated here from the run's
config.yaml, so a run directory holds every file that launched it. accelerate hands the ranks to
torch.distributed.run (torchrun), which copies the parent's environment into every rank (NCCL
safety variables such as NCCL_NVLS_ENABLE=0 survive) and forwards SIGTERM to every rank.

Strategies (training.strategy):
  ddp    a full model copy per process (CUDA: NCCL; CPU: gloo processes for tests)
  fsdp   PyTorch FSDP, FULL_SHARD, transformer-layer auto-wrap (PEFT's wrap policy adds the LoRA
         layers), use_orig_params, sync_module_states, cpu-RAM-efficient loading, optional
         CPU offload of parameters. QLoRA works because 4-bit weights are stored in the compute
         dtype (core/model.py: bnb_4bit_quant_storage = dtype).
  zero2  DeepSpeed ZeRO-2 (optimizer + gradient sharding; offload: optimizer state to CPU)
  zero3  DeepSpeed ZeRO-3 (parameters sharded too; offload: parameters and optimizer to CPU)
DeepSpeed strategies need `deepspeed` installed: resolve() refuses them with a clear message
otherwise. This module imports neither torch nor transformers at import time (the web UI uses
launch_command()).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

ACCELERATE_FILE = "accelerate.yaml"
DEEPSPEED_FILE = "deepspeed.json"
_MIXED = {"bfloat16": "bf16", "float16": "fp16", "float32": "no", "auto": "no"}


# ---------------------------------------------------------------- rank helpers (from torchrun's env)

def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """Rank 0 (or a plain single process): the only writer of run.json, metrics.jsonl, samples, adapter."""
    return rank() == 0


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any rank (all-reduce MAX). A collective: every rank
    must call it at the same point (the Trainer's step boundary)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def die_with_parent() -> None:
    """Linux: a rank gets SIGKILL when its launcher dies (kill -9 of the launcher's group, or
    the grace period of Stop running out) instead of training on as an orphan."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the launcher died before prctl
        os._exit(1)


def env_line() -> str:
    """What every rank logs at start: the NCCL/CUDA variables it inherited from the parent."""
    keys = sorted(k for k in os.environ if k.startswith(("NCCL_", "CUDA_VISIBLE_DEVICES", "TORCH_NCCL_")))
    return f"rank {rank()} env " + (" ".join(f"{k}={os.environ[k]}" for k in keys) or "(no NCCL_* variables)")


# ---------------------------------------------------------------- ranks wait for rank 0's locks

def _go_file(run_dir: Path) -> Path:
    # the ranks of one launch share their parent (the launcher): a file per launch
    return Path(run_dir) / f".ranks-go-{os.getppid()}"


def release_ranks(run_dir: Path) -> None:
    """Rank 0: config resolved and the device locks held; the other ranks may start."""
    _go_file(run_dir).write_text(str(os.getpid()))


def wait_for_rank0(run_dir: Path, poll: float = 0.2) -> None:
    """Other ranks: touch no GPU until rank 0
    holds the device locks. If rank 0 fails, the launcher ends every rank (SIGTERM)."""
    go = _go_file(run_dir)
    while not go.exists():
        time.sleep(poll)


def cleanup(run_dir: Path) -> None:
    _go_file(run_dir).unlink(missing_ok=True)


# ---------------------------------------------------------------- device locks for N cards

def visible_cards(n: int) -> list[str]:
    """The physical indices of the cards a job with n processes uses: the first n entries of
    CUDA_VISIBLE_DEVICES, or 0..n-1 (accelerate gives rank i the i-th visible card)."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None and vis.strip():
        cards = [c.strip() for c in vis.split(",") if c.strip()]
        return cards[:n]
    return [str(i) for i in range(n)]


def lock_keys(device: str, gpus: int) -> list[str]:
    if device.startswith("cuda"):
        return [f"cuda-{c}" for c in visible_cards(gpus)]
    return ["cpu"]


def device_locks(device: str, gpus: int, job: str, run_dir) -> list:
    """One core.locks.DeviceLock per card the job holds (in index order, so two multi-card jobs
    never deadlock). Acquire them in order; release all at exit."""
    from filelock import FileLock

    from . import locks

    out = []
    for key in lock_keys(device, gpus):
        lk = locks.DeviceLock(device, job, run_dir)
        if lk.key != key:  # DeviceLock keys on the first visible card: point it at this card
            lk.key = key
            lk.lock = FileLock(str(locks._locks_dir() / f"{key}.lock"))
        out.append(lk)
    return out


# ---------------------------------------------------------------- generated configs

def deepspeed_config(cfg) -> dict:
    """A DeepSpeed JSON config; "auto" values are filled by the HF Trainer from TrainingArguments."""
    t = cfg.training
    stage = 3 if t.strategy == "zero3" else 2
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=200_000_000, reduce_scatter=True)
    else:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_max_live_parameters=1_000_000_000, stage3_max_reuse_distance=1_000_000_000,
                    sub_group_size=1_000_000_000,
                    stage3_gather_16bit_weights_on_model_save=True)
    if t.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "zero_optimization": zero, "steps_per_print": 1000000, "wall_clock_breakdown": False,
    }


def accelerate_config(cfg, run_dir: Path) -> dict:
    """The accelerate config file for this run (what `accelerate config` would write)."""
    t = cfg.training
    on_cpu = t.device == "cpu"
    base = {
        "compute_environment": "LOCAL_MACHINE", "debug": False, "num_machines": 1, "machine_rank": 0,
        "num_processes": t.gpus, "gpu_ids": "all", "main_training_function": "main",
        "mixed_precision": "no" if on_cpu else _MIXED[cfg.model.dtype], "rdzv_backend": "static",
        "same_network": True, "use_cpu": on_cpu, "downcast_bf16": "no",
        "tpu_env": [], "tpu_use_cluster": False, "tpu_use_sudo": False,
    }
    if t.strategy == "ddp":
        # CPU too: the multi-process launcher (torchrun) with use_cpu gives gloo DDP; accelerate's
        # --cpu flag alone runs one process unless mpirun is set up.
        base["distributed_type"] = "MULTI_GPU"
    elif t.strategy == "fsdp":
        base["distributed_type"] = "FSDP"
        base["fsdp_config"] = {
            "fsdp_version": 1,
            "fsdp_sharding_strategy": "FULL_SHARD",
            # the layer class comes from the model's _no_split_modules (PEFT's policy also wraps LoRA layers)
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_forward_prefetch": False,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",  # checkpoints; the final adapter is gathered in full
            "fsdp_use_orig_params": True,  # PEFT: frozen and trainable params in one FSDP unit
            "fsdp_sync_module_states": True,
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": bool(t.offload),
            "fsdp_activation_checkpointing": False,  # gradient checkpointing is the model's own
        }
    else:
        base["distributed_type"] = "DEEPSPEED"
        base["deepspeed_config"] = {"deepspeed_config_file": str(Path(run_dir) / DEEPSPEED_FILE),
                                    "zero3_init_flag": t.strategy == "zero3"}
    return base


def write_configs(cfg, run_dir: Path) -> Path:
    """Write RUN_DIR/accelerate.yaml (+ deepspeed.json for ZeRO); returns the accelerate file."""
    run_dir = Path(run_dir)
    if cfg.training.strategy in ("zero2", "zero3"):
        (run_dir / DEEPSPEED_FILE).write_text(json.dumps(deepspeed_config(cfg), indent=2))
    path = run_dir / ACCELERATE_FILE
    path.write_text(f"# generated by LoRA Studio for training.strategy={cfg.training.strategy}, "
                    f"gpus={cfg.training.gpus}\n" + yaml.safe_dump(accelerate_config(cfg, run_dir), sort_keys=False))
    return path


def launch_command(cfg, run_dir: Path, resume: bool = False) -> list[str]:
    """`accelerate launch` for the training child (accelerate supports `-m module`)."""
    run_dir = Path(run_dir)
    cfg_file = write_configs(cfg, run_dir)
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg_file),
            "--num_processes", str(cfg.training.gpus), "--main_process_port", "0",
            "-m", "lorastudio.core.train", str(run_dir)] + (["--resume"] if resume else [])


# ---------------------------------------------------------------- schema-level validation

_DS_TOP = {"train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping",
           "bf16", "fp16", "zero_optimization", "steps_per_print", "wall_clock_breakdown", "optimizer", "scheduler"}
_DS_ZERO = {"stage", "overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_partitions",
            "allgather_bucket_size", "reduce_scatter", "stage3_prefetch_bucket_size",
            "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
            "sub_group_size", "stage3_gather_16bit_weights_on_model_save", "offload_optimizer", "offload_param"}


def validate_deepspeed_config(ds: dict) -> list[str]:
    """Problems in a DeepSpeed JSON config (keys and values), [] when valid."""
    errs = [f"unknown key {k}" for k in ds if k not in _DS_TOP]
    for k in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
        v = ds.get(k)
        if not (v == "auto" or (isinstance(v, int) and v > 0)):
            errs.append(f"{k}: must be 'auto' or a positive int (got {v!r})")
    for k in ("bf16", "fp16"):
        if ds.get(k, {}).get("enabled") not in ("auto", True, False):
            errs.append(f"{k}.enabled: must be auto/true/false")
    z = ds.get("zero_optimization") or {}
    errs += [f"zero_optimization.{k}: unknown key" for k in z if k not in _DS_ZERO]
    if z.get("stage") not in (0, 1, 2, 3):
        errs.append(f"zero_optimization.stage: must be 0-3 (got {z.get('stage')!r})")
    if "offload_param" in z and z.get("stage") != 3:
        errs.append("zero_optimization.offload_param: only with stage 3")
    for k in ("offload_optimizer", "offload_param"):
        if k in z and z[k].get("device") not in ("cpu", "nvme", "none"):
            errs.append(f"zero_optimization.{k}.device: cpu, nvme or none")
    if z.get("stage") == 3 and not z.get("stage3_gather_16bit_weights_on_model_save"):
        errs.append("zero_optimization.stage3_gather_16bit_weights_on_model_save: must be true to save the adapter")
    return errs


def validate_accelerate_config(path: Path) -> list[str]:
    """Parse the file back with accelerate's own loader and check every key is one `accelerate
    launch` understands; [] when valid. Imports accelerate (and torch)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    errs: list[str] = []
    try:
        cc = load_config_from_file(str(path))
    except (TypeError, ValueError) as e:
        return [f"accelerate cannot load it: {e}"]
    dests = {a.dest for a in launch_command_parser()._actions}
    if cc.distributed_type not in (DistributedType.MULTI_GPU, DistributedType.FSDP, DistributedType.DEEPSPEED):
        errs.append(f"distributed_type: {cc.distributed_type}")
    for k in cc.fsdp_config or {}:
        if k not in dests:
            errs.append(f"fsdp_config.{k}: not an accelerate launch option")
    for k in cc.deepspeed_config or {}:
        if k not in dests:
            errs.append(f"deepspeed_config.{k}: not an accelerate launch option")
    ds_file = (cc.deepspeed_config or {}).get("deepspeed_config_file")
    if cc.distributed_type == DistributedType.DEEPSPEED:
        if not ds_file or not Path(ds_file).exists():
            errs.append(f"deepspeed_config.deepspeed_config_file: {ds_file} not found")
        else:
            errs += [f"{ds_file}: {e}" for e in validate_deepspeed_config(json.loads(Path(ds_file).read_text()))]
    fc = cc.fsdp_config or {}
    if fc.get("fsdp_cpu_ram_efficient_loading") and not fc.get("fsdp_sync_module_states"):
        errs.append("fsdp_config.fsdp_sync_module_states: must be true with fsdp_cpu_ram_efficient_loading")
    if cc.num_processes < 2:
        errs.append("num_processes: must be >= 2")
    return errs


# ---------------------------------------------------------------- inside the ranks

def sharded(cfg) -> bool:
    """Model weights split across ranks: generation then needs every rank."""
    return is_distributed() and cfg.training.strategy in ("fsdp", "zero3")


@contextmanager
def full_params(wrapped):
    """Full (unsharded) parameters on every rank for generation: FSDP summon_full_params or a
    ZeRO-3 gather; a no-op for DDP and single-process runs. Every rank must enter it."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        FSDP = None
    if FSDP is not None and isinstance(wrapped, FSDP):
        with FSDP.summon_full_params(wrapped, writeback=False, recurse=True):
            yield
        return
    if type(wrapped).__name__ == "DeepSpeedEngine" and getattr(wrapped, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(wrapped.module.parameters()), modifier_rank=None):
            yield
        return
    yield


# ---------------------------------------------------------------- `python -m lorastudio.core.distributed CONFIG --dry-run`

def main(argv: list[str] | None = None) -> int:
    """Dry run: resolve a config (without a GPU, as if on `--device cuda` with N GPUs), write the
    generated files to --out, validate them and print the launch command."""
    import argparse

    from . import config as config_lib
    from . import resolve

    ap = argparse.ArgumentParser(prog="python -m lorastudio.core.distributed")
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="generate and validate only (no GPU needed)")
    a = ap.parse_args(argv)
    cfg = config_lib.load(a.config, a.set)
    # the dry run: what the resolver fills on an assumed CUDA machine, without asking for one
    cfg = resolve.resolve(cfg, resolve.assumed(cfg.training.device) if a.dry_run else None)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = launch_command(cfg, out)
    errs = validate_accelerate_config(out / ACCELERATE_FILE)
    print((out / ACCELERATE_FILE).read_text())
    if (out / DEEPSPEED_FILE).exists():
        print((out / DEEPSPEED_FILE).read_text())
    print("launch:", " ".join(cmd))
    for e in errs:
        print("INVALID:", e)
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main())


def planned_steps(cfg, rows: int) -> int:
    """The optimizer steps the run plans (training.max_steps, else epochs x rows / effective batch);
    a ConfigError past core.config.MAX_TOTAL_STEPS (a typo of 1e12 epochs, not a run)."""
    from . import config as config_lib

    t = cfg.training
    batches = -(-rows // (t.micro_batch_size * world_size()))  # ceil: micro-batches per epoch
    per_epoch = max(1, -(-batches // t.grad_accum))
    steps = t.max_steps if t.max_steps > 0 else math.ceil(per_epoch * t.epochs)
    if steps > config_lib.MAX_TOTAL_STEPS:
        raise config_lib.ConfigError(
            f"training.epochs: {t.epochs:g} epochs of {rows:,} rows make {steps:,} steps; at most "
            f"{config_lib.MAX_TOTAL_STEPS:,} (lower training.epochs, or set training.max_steps)")
    return steps
