"""`lorastudio` command line. Bare `lorastudio` launches the web app.

Subcommand names are a contract other tools use:
  webui, list-presets, copy-preset, train, estimate, resume, runs, stop, preview, convert, chat
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from lorastudio import presets
from . import estimate_text
from lorastudio.core import resolve

EXIT_USAGE = 2


def _err(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


# ---------------------------------------------------------------- presets

def cmd_list_presets(a) -> int:
    import yaml

    rows = []
    for name, path in sorted(presets.preset_files().items()):
        text = path.read_text()
        data = yaml.safe_load(text) or {}
        rows.append((name, data.get("model", {}).get("name_or_path", "?"), data.get("method", "lora"),
                     _preset_vram(text)))
    w = max(len(r[0]) for r in rows) if rows else 4
    print(f"{'NAME':<{w}}  {'METHOD':<6}  {'VRAM':>9}  MODEL")
    for name, model, method, vram in rows:
        print(f"{name:<{w}}  {method:<6}  {vram:>9}  {model}")
    return 0


def _preset_vram(text: str) -> str:
    """The preset's `# estimated peak VRAM: X GiB` line (a test keeps it equal to core.estimate)."""
    import re

    m = re.search(r"^# estimated peak VRAM: ([0-9.]+) GiB", text, re.M)
    return f"{m.group(1)} GiB" if m else "-"


def cmd_copy_preset(a) -> int:

    src = presets.find(a.name)
    if src is None:
        return _err(f"no preset named {a.name!r} (see `lorastudio list-presets`)")
    dest = Path(a.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists():
        return _err(f"{dest} exists; not overwriting")
    shutil.copyfile(src, dest)
    print(dest)
    return 0


# ---------------------------------------------------------------- training

def cmd_train(a) -> int:
    from lorastudio.core import config as config_lib
    from lorastudio.core import runs

    cfg_path = presets.resolve(a.config)
    try:
        cfg = resolve.resolve(config_lib.load(cfg_path, a.set + _scale_sets(a)))
    except config_lib.ConfigError as e:
        return _err(str(e), runs.EXIT_CONFIG)
    if a.gpu_mem is not None:  # pre-flight: the estimate before Start (it never blocks the run)
        from lorastudio.core import estimate as estimate_lib

        try:
            est = estimate_lib.estimate(cfg, gpu_mem_gib=estimate_lib.parse_gpu_mem(a.gpu_mem) if a.gpu_mem else None)
            print(estimate_text.format_text(est), flush=True)
        except (estimate_lib.EstimateError, ValueError) as e:
            print(f"estimate unavailable: {e}", file=sys.stderr)
    try:
        run_dir = runs.create_run(cfg, source=str(cfg_path), notes=(f"resolved from {cfg_path}",),
                                  run_dir=a.run_dir, start=False)
    except runs.LaunchError as e:
        return _err(str(e))
    except config_lib.ConfigError as e:
        return _err(str(e), runs.EXIT_CONFIG)
    proc = runs.launch(run_dir)
    print(f"run dir: {run_dir}", flush=True)
    if a.detach:
        return 0
    return _follow(run_dir, proc)


def cmd_estimate(a) -> int:
    """Peak VRAM by component, fits / does not fit, suggestions and time, before any download."""
    from lorastudio.core import config as config_lib
    from lorastudio.core import estimate as estimate_lib

    cfg_path = presets.resolve(a.config)
    try:
        cfg = config_lib.load(cfg_path, a.set)
        gpu = estimate_lib.parse_gpu_mem(a.gpu_mem)
        est = estimate_lib.estimate(cfg, gpu_mem_gib=gpu, dataset_tokens=a.dataset_tokens)
    except (config_lib.ConfigError, estimate_lib.EstimateError, ValueError) as e:
        return _err(str(e))
    if a.json:
        print(json.dumps(est, indent=1, default=str))
    else:
        print(estimate_text.format_text(est))
    return 0 if est["fits"] is not False else 1


def _scale_sets(a) -> list[str]:
    """--gpus/--strategy/--offload as config overrides (training.gpus, .strategy, .offload)."""
    out = []
    if getattr(a, "gpus", None) is not None:
        out.append(f"training.gpus={a.gpus}")
    if getattr(a, "strategy", None) is not None:
        out.append(f"training.strategy={a.strategy}")
    if getattr(a, "offload", False):
        out.append("training.offload=true")
    return out


def cmd_resume(a) -> int:
    from lorastudio.core import runs

    run_dir = Path(a.run_dir).resolve()
    info = runs.status(run_dir)
    if not info:
        return _err(f"{run_dir} is not a run directory (no run.json)")
    if info.get("status") in runs.ACTIVE:
        return _err(f"{run_dir} is still {info['status']} (pid {info.get('pid')}); stop it first")
    if _scale_sets(a):  # resume on another number of processes/strategy: rewrite config.yaml
        from lorastudio.core import config as config_lib

        path = run_dir / "config.yaml"
        try:
            cfg = resolve.resolve(config_lib.load(path, _scale_sets(a)))
        except config_lib.ConfigError as e:
            return _err(str(e), runs.EXIT_CONFIG)
        header = "\n".join(ln for ln in path.read_text().splitlines() if ln.startswith("#"))
        config_lib.save(cfg, path, header=header + "\n" if header else "")
    try:
        proc = runs.launch(run_dir, resume=True)
    except runs.LaunchError as e:
        return _err(str(e))
    print(f"resuming {run_dir}", flush=True)
    if a.detach:
        return 0
    return _follow(run_dir, proc)


def _echo_from(log: Path, pos: int) -> int:
    """Print what the child appended to its log since byte `pos`; return the new position."""
    if not log.exists():
        return pos
    with open(log, "rb") as f:
        f.seek(pos)
        chunk = f.read()
    if chunk:
        sys.stdout.write(chunk.decode("utf-8", "replace"))
        sys.stdout.flush()
    return pos + len(chunk)


def _follow(run_dir: Path, proc) -> int:
    """Echo train.log while the child runs; Ctrl-C stops the run cleanly (SIGTERM, grace, SIGKILL)."""
    from lorastudio.core import runs

    log = run_dir / "train.log"
    pos = 0
    interrupted = False

    def on_int(signum, frame):
        nonlocal interrupted
        interrupted = True

    old = signal.signal(signal.SIGINT, on_int)
    try:
        while True:
            pos = _echo_from(log, pos)
            if interrupted:
                print("\nstopping (saving at the next step)...", flush=True)
                runs.stop(run_dir, grace=60)
                interrupted = False
            code = proc.poll()
            if code is not None:
                _echo_from(log, pos)  # the last lines written before it exited
                info = runs.read_json(run_dir)
                if info.get("launcher") and info.get("exit_code") is not None:
                    code = info["exit_code"]  # accelerate launch exits 1 for any rank's non-zero exit
                if code != 0 and info.get("error"):
                    print(f"error: {info['error']}", file=sys.stderr)
                return code
            time.sleep(0.3)
    finally:
        signal.signal(signal.SIGINT, old)


def cmd_runs(a) -> int:
    from lorastudio.core import runs

    items = runs.list_runs()
    if a.json:
        print(json.dumps(items, indent=2, default=str))
        return 0
    if not items:
        print("no runs yet (lorastudio train presets/tiny_demo.yaml)")
        return 0
    print(f"{'STATUS':<9} {'STEP':>10} {'LOSS':>8}  RUN")
    from lorastudio.core.history import _number

    for info in items:
        events, _ = runs.read_events(info["run_dir"])
        steps = [e for e in events if e.get("event") == "step"]
        last = steps[-1] if steps else {}
        total = _number(last.get("total_steps"))
        step = f"{int(_number(last.get('step')) or 0)}/{int(total) if total else '?'}" if last else "-"
        loss = f"{_number(last.get('loss')):.4f}" if _number(last.get("loss")) is not None else "-"
        print(f"{info.get('status', '?'):<9} {step:>10} {loss:>8}  {info['run_dir']}")
        if info.get("status") == "failed" and info.get("error"):
            print(f"          error: {info['error']}")
        if info.get("status") == "queued" and info.get("queue_position"):
            print(f"          queued: position {info['queue_position']} for {info.get('queue_device')} "
                  f"(held by {info.get('queue_holder')})")
    return 0


def cmd_stop(a) -> int:
    from lorastudio.core import runs

    from lorastudio.core import jobs

    run_dir = Path(a.run_dir).resolve()
    if not (run_dir / "run.json").exists():
        return _err(f"{run_dir} is not a run directory (no run.json)")
    if jobs.record(run_dir) is None:
        return _err(f"{run_dir}: no process of it was started by LoRA Studio here ($LORASTUDIO_HOME/jobs has no "
                    "record of it): nothing to stop", 1)
    print(runs.stop(run_dir, grace=a.grace))
    return 0


# ---------------------------------------------------------------- preview

def cmd_preview(a) -> int:
    from lorastudio.core import preview

    try:
        custom = Path(a.custom_template).read_text(encoding="utf-8") if a.custom_template else None
        template = "custom" if custom and not a.template else a.template
        samples, reports, warnings = preview.preview_with_reports(
            config=a.config, model=a.model, data=a.data, template=template, n=a.n, fmt=a.format,
            custom_jinja=custom, cutoff_len=a.cutoff)
    except Exception as e:  # noqa: BLE001 - bad input: one clear line, no traceback
        return _err(str(e), 2)
    # what was skipped and why goes to stderr, so --json output stays clean
    for r in reports:
        print(f"data: {r.summary()}", file=sys.stderr)
        for sk in r.skipped[:5]:
            print(f"  skipped {sk.reason}", file=sys.stderr)
        if r.rows_skipped > 5:
            print(f"  ... and {r.rows_skipped - 5} more", file=sys.stderr)
    for w in warnings:
        print(f"template warning: {w}", file=sys.stderr)
    if a.json:
        print(json.dumps([{k: s[k] for k in ("messages", "text", "trained_spans")}
                          | ({"text_only": s["text_only"]} if "text_only" in s else {}) for s in samples],
                         ensure_ascii=False, indent=1))
        return 0
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    for i, s in enumerate(samples):
        print(f"--- sample {i + 1}: {s['n_tokens']} tokens, {s['n_trained']} trained"
              + (" (truncated)" if s["truncated"] else "") + " ---")
        print(preview.highlight(s["text"], s["trained_spans"], color=color))
    if samples and not color:
        print("(trained text is shown between [[ and ]])")
    return 0


def cmd_retry(a) -> int:
    """Start a new run from a failed one with the suggested change (after OOM: half the
    micro-batch, double the accumulation, same effective batch)."""
    from lorastudio.core import config as config_lib
    from lorastudio.core import recovery

    run_dir = Path(a.run_dir).resolve()
    if not (run_dir / "config.yaml").exists():
        return _err(f"{run_dir} is not a run directory (no config.yaml)")
    try:
        new_dir = recovery.retry(run_dir, launch=False)
    except config_lib.ConfigError as e:
        return _err(str(e))
    from lorastudio.core import runs

    proc = runs.launch(new_dir)
    print(f"run dir: {new_dir}", flush=True)
    return 0 if a.detach else _follow(new_dir, proc)


# ---------------------------------------------------------------- convert and chat

def cmd_convert(a) -> int:
    """Export (or --merge) in a child job with its own log, RUN_DIR/convert.log, followed here."""
    from lorastudio.core import runs

    run_dir = Path(a.run_dir).resolve()
    if not (run_dir / "config.yaml").exists():
        return _err(f"{run_dir} is not a run directory (no config.yaml)")
    cmd = [sys.executable, "-m", "lorastudio.core.convert", str(run_dir), "--dtype", a.dtype]
    cmd += ["--merge"] if a.merge else []
    cmd += ["--checkpoint", str(a.checkpoint)] if a.checkpoint is not None else []
    cmd += ["--out", str(Path(a.out).resolve())] if a.out else []
    _, offset = runs.read_events(run_dir)
    log = run_dir / "convert.log"
    pos = log.stat().st_size if log.exists() else 0  # echo only this conversion's part of the log
    proc = runs.spawn(cmd, log, cwd=run_dir)
    try:
        while True:
            code = proc.poll()
            pos = _echo_from(log, pos)
            if code is not None:
                break
            time.sleep(0.3)
    except KeyboardInterrupt:  # the child removes its half-written output on SIGTERM
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        return _err("interrupted", runs.EXIT_STOPPED)
    if code != 0:
        events, _ = runs.read_events(run_dir, offset)
        failed = [e for e in events if e.get("event") == "convert_failed"]
        return _err(failed[-1]["error"] if failed else f"convert exited with {code} (see {log})", code)
    return 0


def cmd_chat(a) -> int:
    """One scripted answer (--prompt) or an interactive chat (RESET clears, EXIT quits)."""
    from lorastudio.core import chat
    from lorastudio.core import model as model_lib

    try:
        model, tokenizer, template = chat.load_chat_model(a.target, a.checkpoint, a.device)
    except (chat.ChatError, model_lib.ModelError, ValueError, OSError) as e:
        return _err(str(e))
    if template is None:
        print(f"note: {chat.COMPLETION_NOTICE}", file=sys.stderr)
    use_adapter = not a.base
    if a.base and not hasattr(model, "disable_adapter"):
        print("note: --base: this target has no adapter; answering with the model as it is", file=sys.stderr)
    gen = dict(system=a.system, greedy=a.greedy, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
               top_p=a.top_p, top_k=a.top_k, repetition_penalty=a.repetition_penalty, use_adapter=use_adapter)
    if a.prompt is not None:  # scripted: only the answer on stdout
        try:
            print(chat.reply(model, tokenizer, template, [{"role": "user", "content": a.prompt}], **gen))
        except chat.ChatError as e:
            return _err(str(e), 1)
        return 0
    print("type RESET to clear the history, EXIT to quit", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            text = input("\n>>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text.strip() == "EXIT":
            return 0
        if text.strip() == "RESET":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        answer = ""
        try:
            for chunk in chat.stream_reply(model, tokenizer, template, history, **gen):
                answer += chunk
                sys.stdout.write(chunk)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this answer, keep the chat
            pass
        except chat.ChatError as e:
            print(f"\nerror: {e}", file=sys.stderr)
        print()
        history.append({"role": "assistant", "content": answer.strip()})


# ---------------------------------------------------------------- web app

def cmd_webui(a) -> int:
    from lorastudio.webui.app import LaunchError, launch

    credentials = None
    if a.auth:
        if ":" not in a.auth:
            return _err("--auth expects USER:PASSWORD")
        credentials = tuple(a.auth.split(":", 1))
    try:
        return launch(host=a.host, port=a.port, auth=False if a.no_auth else None, allow_dirs=a.allow_dir, share=a.share,
                      credentials=credentials, max_upload_mb=a.max_upload_mb) or 0
    except LaunchError as e:
        return _err(str(e))


def _add_scale_flags(p) -> None:
    p.add_argument("--gpus", type=int, metavar="N", help="processes, one per GPU (training.gpus); N > 1 runs "
                   "through `accelerate launch` (on CPU: N gloo processes)")
    p.add_argument("--strategy", choices=["ddp", "fsdp", "zero2", "zero3"],
                   help="multi-GPU strategy (training.strategy); zero2/zero3 need DeepSpeed installed")
    p.add_argument("--offload", action="store_true", help="fsdp/zero: keep parameters/optimizer state in CPU RAM")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lorastudio", description="LoRA Studio: fine-tune LLMs with LoRA/QLoRA. "
                                 "Run with no subcommand to open the web app.")
    sub = ap.add_subparsers(dest="cmd")

    p = sub.add_parser("webui", help="launch the web app (default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--no-auth", action="store_true", help="no access token (anyone on this machine can use it)")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="login required; needed for --share or a non-local --host")
    p.add_argument("--share", action="store_true", help="a public Gradio link (requires --auth)")
    p.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                   help="let the app read files under DIR (default: the workspace and the current folder)")
    p.add_argument("--max-upload-mb", type=int, default=200, help="largest upload accepted (MB)")
    p.set_defaults(func=cmd_webui)

    p = sub.add_parser("list-presets", help="list shipped presets")
    p.set_defaults(func=cmd_list_presets)

    p = sub.add_parser("copy-preset", help="copy a preset to edit it")
    p.add_argument("name")
    p.add_argument("dest")
    p.set_defaults(func=cmd_copy_preset)

    p = sub.add_parser("train", help="train from a config (a YAML file or a preset name)")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.learning_rate=1e-4")
    p.add_argument("--run-dir", help="run directory (default: a new one under $LORASTUDIO_HOME/runs)")
    p.add_argument("--detach", action="store_true", help="start the run and return")
    p.add_argument("--gpu-mem", nargs="?", const="", default=None, metavar="SIZE",
                   help="print the VRAM estimate before starting, against SIZE (e.g. 24GB) or the detected GPU")
    _add_scale_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("estimate", help="peak VRAM and time estimate of a config: fits or not, what to change")
    p.add_argument("config")
    p.add_argument("--gpu-mem", metavar="SIZE", help="the card to check against, e.g. 24GB (default: the detected GPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--dataset-tokens", type=int, help="tokens per epoch, for the time estimate")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("resume", help="continue a stopped or failed run from its last checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--detach", action="store_true")
    _add_scale_flags(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("runs", help="list runs in the workspace")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("stop", help="stop a run (SIGTERM, then SIGKILL after --grace seconds)")
    p.add_argument("run_dir")
    p.add_argument("--grace", type=float, default=30.0)
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("preview", help="render samples exactly as training sees them")
    p.add_argument("config", nargs="?")
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--template", default=None)
    p.add_argument("--format", default="auto", help="dataset format (default: detect)")
    p.add_argument("--custom-template", metavar="FILE", help="a Jinja chat template file (rendered in a sandbox)")
    p.add_argument("--cutoff", type=int, default=None, help="truncate samples to N tokens, as training would")
    p.add_argument("-n", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("retry", help="start a failed run again with the suggested fix (e.g. after out-of-memory)")
    p.add_argument("run_dir")
    p.add_argument("--detach", action="store_true")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("convert", help="export a run's adapter, or --merge it into a full model")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", type=int, help="convert RUN_DIR/checkpoint-N instead of adapter/")
    p.add_argument("--merge", action="store_true", help="write a full merged model (safetensors)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16"],
                   help="merged weights dtype (auto: the base model's)")
    p.add_argument("--out", help="output folder (default RUN_DIR/export-adapter or RUN_DIR/merged); never overwritten")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("chat", help="chat with a run, a merged model or a base model (RESET, EXIT)")
    p.add_argument("target", help="a run dir, a merged/model folder, a hub id or builtin:tiny")
    p.add_argument("--checkpoint", type=int)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--prompt", help="answer this one prompt on stdout and exit")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (deterministic)")
    p.add_argument("--base", action="store_true", help="answer with the base model (adapter disabled)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_chat)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.cmd is None:
        a = ap.parse_args(["webui"])
    if a.cmd == "preview" and not a.config and not (a.model and a.data):
        ap.error("preview needs CONFIG, or --model and --data")
    return a.func(a)

