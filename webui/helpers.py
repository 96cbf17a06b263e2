"""Shared UI helpers: they return data (lists, dicts, DataFrames), not components, so they test
without a browser. Errors become one readable line, never a traceback.

Tab-specific logic lives in tab_*.py; this module keeps what several tabs share plus the
original minimal-app functions (kept for API compatibility)."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from core import runs


# ---------------------------------------------------------------- messages

def error_text(e: BaseException) -> str:
    """One readable line for the user: the message of our own errors, the type for the rest."""
    msg = str(e).strip() or type(e).__name__
    ours = ("ConfigError", "DataError", "TemplateError", "ModelError", "ConvertError", "ChatError", "ValueError",
            "FileNotFoundError", "AccessError")
    if type(e).__name__ not in ours:
        msg = f"{type(e).__name__}: {msg}"
    return msg.splitlines()[0] if len(msg) > 2000 else msg


def err_md(e: BaseException | str) -> str:
    return f"**Error:** {e if isinstance(e, str) else error_text(e)}"


def readable(value: str | None) -> str:
    """A local path the browser may make this process read (core.access allow-list: the
    workspace, the launch folder, --allow-dir folders), resolved; builtin names and hub ids pass.
    Raises core.access.AccessError otherwise."""
    from core import access

    value = (value or "").strip()
    return access.check_readable(value) if value else value


# ---------------------------------------------------------------- presets and runs

def preset_names() -> list[str]:
    import presets

    return sorted(presets.preset_files())


def run_dirs() -> list[str]:
    """Every run directory in the workspace, newest first."""
    return [i["run_dir"] for i in runs.list_runs()]


def latest_run() -> str:
    items = runs.list_runs()
    return items[0]["run_dir"] if items else ""


def parse_sources(text: str) -> list[dict]:
    """Dataset box -> config sources. One source per line: `PATH`, `PATH | RATIO` (mix ratio) or
    `PATH | RATIO | FORMAT` (a per-file format override)."""
    out = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, _, rest = line.partition("|")
        ratio, _, fmt = rest.partition("|")
        src: dict = {"path": path.strip()}
        if fmt.strip():
            src["format"] = fmt.strip().lower()
        if ratio.strip():
            try:
                src["ratio"] = float(ratio)
            except ValueError:
                raise ValueError(f"dataset line {line!r}: ratio {ratio.strip()!r} is not a number") from None
        out.append(src)
    if not out:
        raise ValueError("no dataset given (a path, builtin:sample, or an upload)")
    return out


def parse_columns(text: str) -> dict | None:
    """`instruction=question, output=answer` -> {"instruction": "question", "output": "answer"}."""
    if not (text or "").strip():
        return None
    out = {}
    for part in text.replace("\n", ",").split(","):
        if not part.strip():
            continue
        key, sep, col = part.partition("=")
        if not sep or not key.strip() or not col.strip():
            raise ValueError(f"column mapping {part.strip()!r}: expected key=column")
        out[key.strip()] = col.strip()
    return out


# ---------------------------------------------------------------- preview (api_name="preview")

def highlight_pieces(text: str, spans: list) -> list[tuple[str, str | None]]:
    pieces: list[tuple[str, str | None]] = []
    pos = 0
    for start, end in spans:
        pieces += [(text[pos:start], None), (text[start:end], "trained")]
        pos = end
    pieces.append((text[pos:], None))
    return [(t, label) for t, label in pieces if t]


def preview_highlight(model: str, data: str, template: str, n: float):
    from core import preview

    try:
        src = readable(parse_sources(data)[0]["path"])
        samples = preview.preview_samples(model=readable(model), data=src, template=template or "auto", n=int(n))
    except Exception as e:  # noqa: BLE001 - shown to the user as a message
        return [], err_md(e)
    pieces: list[tuple[str, str | None]] = []
    for i, s in enumerate(samples):
        pieces.append((f"\n--- sample {i + 1} ({s['n_tokens']} tokens, {s['n_trained']} trained) ---\n", None))
        pieces += highlight_pieces(s["text"], s["trained_spans"])
    return pieces, f"{len(samples)} samples rendered"


# ---------------------------------------------------------------- minimal-app handlers (kept)

def start_preset(preset: str):
    from . import tab_train

    return tab_train.start_from_dict(preset, {})[:2]


def stop_run(run_dir: str):
    if not run_dir:
        return "no run"
    return f"status: {runs.stop(run_dir, grace=30)}"


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


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def now() -> float:
    return time.time()


def short(path: str) -> str:
    return Path(path).name if path else ""
