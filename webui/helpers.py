"""UI handlers: they return data (lists, dicts, DataFrames), not components, so they test
without a browser. Errors become one readable line, never a traceback."""

from __future__ import annotations

import time

import pandas as pd

from core import runs


def preset_names() -> list[str]:
    import presets

    return sorted(presets.preset_files())


def preview_highlight(model: str, data: str, template: str, n: float):
    from core import preview

    try:
        samples = preview.preview_samples(model=model, data=data, template=template or "auto", n=int(n))
    except Exception as e:  # noqa: BLE001 - shown to the user as a message
        return [], f"**Error:** {e}"
    pieces: list[tuple[str, str | None]] = []
    for i, s in enumerate(samples):
        pieces.append((f"\n--- sample {i + 1} ({s['n_tokens']} tokens, {s['n_trained']} trained) ---\n", None))
        pos = 0
        for start, end in s["trained_spans"]:
            pieces += [(s["text"][pos:start], None), (s["text"][start:end], "trained")]
            pos = end
        pieces.append((s["text"][pos:], None))
    return [(t, label) for t, label in pieces if t], f"{len(samples)} samples rendered"


def start_preset(preset: str):
    import presets
    from core import config as config_lib

    path = presets.find(preset)
    if path is None:
        return "", f"**Error:** no preset {preset!r}"
    try:
        cfg = config_lib.load(path)
    except config_lib.ConfigError as e:
        return "", f"**Error:** {e}"
    run_dir = runs.new_run_dir(None, cfg.model.name_or_path, cfg.method)
    # the child resolves device-dependent values itself; the UI process never imports torch
    config_lib.save(cfg, run_dir / "config.yaml", header=f"# lorastudio train {run_dir / 'config.yaml'}\n")
    runs.write_json(run_dir, status="queued", created=time.time(), source_config=str(path), run_name=run_dir.name)
    runs.launch(run_dir)
    return str(run_dir), "started"


def stop_run(run_dir: str):
    if not run_dir:
        return "no run"
    return f"status: {runs.stop(run_dir, grace=30)}"


def latest_run() -> str:
    items = runs.list_runs()
    return items[0]["run_dir"] if items else ""


def poll_run(run_dir: str):
    if not run_dir:
        return pd.DataFrame({"step": [], "loss": []}), "", ""
    events, _ = runs.read_events(run_dir)
    steps = [e for e in events if e.get("event") == "step"]
    df = pd.DataFrame({"step": [e["step"] for e in steps], "loss": [e["loss"] for e in steps]})
    info = runs.status(run_dir)
    last = steps[-1] if steps else {}
    line = f"status: **{info.get('status', '?')}**"
    if last:
        line += f" · step {last['step']}/{last.get('total_steps')} · loss {last['loss']:.4f}"
    if info.get("error"):
        line += f"\n\n**Error:** {info['error']}"
    return df, line, "\n".join(runs.log_tail(run_dir, 15))
