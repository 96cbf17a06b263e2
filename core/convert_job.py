"""The convert child: `python -m lorastudio.core.convert_job RUN_DIR [--checkpoint N] [--merge]
[--dtype auto|float32|bfloat16|float16] [--gguf TYPE] [--out DIR]`: an adapter export, a verified
merge (core.convert) or a GGUF export (core.gguf_export, which merges through core.convert), in
its own process group with output to RUN_DIR/convert.log, reporting through RUN_DIR/metrics.jsonl
(convert_start, convert_end, convert_failed). Its own module so that core.convert and
core.gguf_export import one another in one direction only."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from . import convert, runs
from .convert import log


def _event(run_dir: Path, event: str, **fields) -> None:
    # with this process's pid: two jobs on one run (one refused) each find their own result
    runs.append_event(run_dir, event, pid=os.getpid(), **fields)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lorastudio.core.convert_job")
    ap.add_argument("run_dir")
    ap.add_argument("--checkpoint", type=int)
    ap.add_argument("--merge", action="store_true")
    ap.add_argument("--gguf", metavar="TYPE", help="GGUF export through the merge (core.gguf_export): f16, q8_0, q4_k_m...")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    from .child import quiet_libraries

    quiet_libraries()  # before torch, transformers and bitsandbytes are imported
    run_dir = Path(a.run_dir).resolve()
    # SIGTERM -> SystemExit, so the finally blocks remove the half-written OUT.partial
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(runs.EXIT_STOPPED))
    if not (run_dir / "config.yaml").exists():
        log(f"FAILED: {run_dir} is not a run directory (no config.yaml)")
        return runs.EXIT_CONFIG
    kind = "gguf" if a.gguf else "merge" if a.merge else "export-adapter"
    from . import machine
    from .locks import Busy, writer_lock

    if machine.device_for(a.device) == "cpu":
        machine.limit_memory("cpu_job")  # a merge too big for this machine fails here, alone

    try:  # one writer per run: no merge beside training, a second merge or a delete
        lock = writer_lock(run_dir)  # noqa: F841 - held until this process exits
    except Busy:
        error = f"{run_dir.name} is in use (training, or another merge or export); try again when it ends"
        _event(run_dir, "convert_failed", kind=kind, error=error)
        log(f"FAILED: {error}")
        return runs.EXIT_CONFIG
    _event(run_dir, "convert_start", kind=kind, checkpoint=a.checkpoint, dtype=a.dtype, out=a.out)
    t0 = time.time()
    try:
        if a.gguf:
            from . import gguf_export  # (llama.cpp's tools only where a GGUF is asked for)

            report = gguf_export.export(run_dir, a.gguf, a.checkpoint, a.out, a.device)
        elif a.merge:
            report = convert.merge(run_dir, a.checkpoint, a.dtype, a.out, a.device)
        else:
            report = {"out": str(convert.export_adapter(run_dir, a.checkpoint, a.out)), "checkpoint": a.checkpoint}
    except Exception as e:  # noqa: BLE001 - every failure must reach metrics.jsonl with a message
        bad_input = isinstance(e, ValueError)  # ConvertError, ConfigError, ModelError, TemplateError
        if not bad_input:
            traceback.print_exc()
        error = str(e) if bad_input else f"{type(e).__name__}: {e}"
        _event(run_dir, "convert_failed", kind=kind, error=error)
        log(f"FAILED: {error}")
        return runs.EXIT_CONFIG if bad_input else runs.EXIT_FAILED
    _event(run_dir, "convert_end", kind=kind, out=report["out"], elapsed_s=round(time.time() - t0, 2),
                      verification=report.get("verification"))
    log(f"done: {report['out']}")
    return runs.EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
