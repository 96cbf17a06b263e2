"""Commands about presets, data and finished runs: list-presets, copy-preset, preview, convert, chat."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from lorastudio import presets

from .common import echo_from, err


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
        return err(f"no preset named {a.name!r} (see `lorastudio list-presets`)")
    dest = Path(a.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists():
        return err(f"{dest} exists; not overwriting")
    shutil.copyfile(src, dest)
    print(dest)
    return 0


def cmd_preview(a) -> int:
    from lorastudio.core import preview

    try:
        custom = Path(a.custom_template).read_text(encoding="utf-8") if a.custom_template else None
        template = "custom" if custom and not a.template else a.template
        if a.n < 1:
            raise ValueError(f"-n must be at least 1, got {a.n}")
        samples, reports, warnings, refused = preview.preview_with_reports(
            config=a.config, model=a.model, data=a.data, template=template, n=a.n, fmt=a.format,
            custom_jinja=custom, cutoff_len=a.cutoff, trust=a.trust_remote_code,
            train_on=a.train_on, reasoning=a.reasoning, system=a.system)
    except Exception as e:  # noqa: BLE001 - bad input: one clear line, no traceback
        return err(" ".join(str(e).split()) or type(e).__name__, 2)
    # what was skipped and why goes to stderr, so --json output stays clean
    for r in reports:
        print(f"data: {r.summary()}", file=sys.stderr)
        for sk in r.skipped[:5]:
            print(f"  skipped {sk.reason}", file=sys.stderr)
        if r.rows_skipped > 5:
            print(f"  ... and {r.rows_skipped - 5} more", file=sys.stderr)
    for reason in refused[:5]:
        print(f"template refused {reason}", file=sys.stderr)
    for w in warnings:
        print(f"template warning: {w}", file=sys.stderr)
    if a.json:
        keys = ("row", "messages", "tools", "text", "trained_spans", "notes", "text_only", "label", "chosen",
                "rejected", "completion")  # the last four: preference rows (core.preference_data)
        print(json.dumps([{k: s[k] for k in keys if k in s} for s in samples], ensure_ascii=False, indent=1))
        return 0
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    for i, s in enumerate(samples):
        for side in [k for k in ("chosen", "rejected", "completion") if k in s] or [None]:
            one = s[side] if side else s
            what = f"{side}{' (label ' + str(s['label']).lower() + ')' if 'label' in s else ''}, " if side else ""
            print(f"--- sample {i + 1} (row {s['row']}): {what}{one['n_tokens']} tokens, {one['n_trained']} trained"
                  + (" (truncated)" if one["truncated"] else "") + "".join(f"; {n}" for n in one.get("notes", []))
                  + " ---")
            print(preview.highlight(one["text"], one["trained_spans"], color=color))
    if samples and not color:
        print("(trained text is shown between [[ and ]])")
    return 0


def cmd_convert(a) -> int:
    """Export (or --merge) in a child job with its own log, RUN_DIR/convert.log, followed here."""
    from lorastudio.core import runs

    run_dir = Path(a.run_dir).resolve()
    if not (run_dir / "config.yaml").exists():
        return err(f"{run_dir} is not a run directory (no config.yaml)")
    cmd = [sys.executable, "-m", "lorastudio.core.convert_job", str(run_dir), "--dtype", a.dtype]
    cmd += ["--merge"] if a.merge else []
    cmd += ["--gguf", a.gguf] if a.gguf else []
    cmd += ["--checkpoint", str(a.checkpoint)] if a.checkpoint is not None else []
    cmd += ["--out", str(Path(a.out).resolve())] if a.out else []
    _, offset = runs.read_events(run_dir)
    log = run_dir / "convert.log"
    pos = log.stat().st_size if log.exists() else 0  # echo only this conversion's part of the log
    proc = runs.spawn(cmd, log, cwd=run_dir)
    try:
        while True:
            code = proc.poll()
            pos = echo_from(log, pos)
            if code is not None:
                break
            time.sleep(0.3)
    except KeyboardInterrupt:  # the child removes its half-written output on SIGTERM
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        return err("interrupted", runs.EXIT_STOPPED)
    if code != 0:
        events, _ = runs.read_events(run_dir, offset)
        failed = [e for e in events if e.get("event") == "convert_failed"]
        return err(failed[-1]["error"] if failed else f"convert exited with {code} (see {log})", code)
    return 0


def cmd_chat(a) -> int:
    """One scripted answer (--prompt) or an interactive chat (RESET clears, EXIT quits). The
    libraries' warnings and log lines go to $LORASTUDIO_HOME/logs/chat.log, not the terminal."""
    from lorastudio.core import workspace
    from lorastudio.core.child import quiet_libraries

    logs = workspace.home() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    quiet_libraries(log_file=logs / "chat.log")  # before transformers, peft and bitsandbytes load
    from lorastudio.core import chat, generate
    from lorastudio.core import model as model_lib

    try:
        model, tokenizer, template = chat.load_chat_model(a.target, a.checkpoint, a.device)
    except (chat.ChatError, model_lib.ModelError, ValueError, OSError) as e:
        return err(str(e))
    if template is None:
        print(f"note: {chat.COMPLETION_NOTICE}", file=sys.stderr)
    use_adapter = not a.base
    if a.base and not hasattr(model, "disable_adapter"):
        print("note: --base: this target has no adapter; answering with the model as it is", file=sys.stderr)
    gen = dict(system=a.system, greedy=a.greedy, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
               top_p=a.top_p, top_k=a.top_k, repetition_penalty=a.repetition_penalty, use_adapter=use_adapter)
    if a.prompt is not None:  # scripted: only the answer on stdout
        try:
            print(generate.reply(model, tokenizer, template, [{"role": "user", "content": a.prompt}], **gen))
        except generate.GenerationError as e:
            return err(str(e), 1)
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
            for chunk in generate.stream(model, tokenizer, template, history, **gen):
                answer += chunk
                sys.stdout.write(chunk)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this answer, keep the chat
            pass
        except generate.GenerationError as e:
            print(f"\nerror: {e}", file=sys.stderr)
        print()
        history.append({"role": "assistant", "content": answer.strip()})
