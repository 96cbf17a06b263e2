"""Shared UI helpers: they return data (lists, dicts, DataFrames), not components, so they test
without a browser. Errors become one readable line, never a traceback.

Tab-specific logic lives in tab_*.py; this module keeps what several tabs share plus the
original minimal-app functions (kept for API compatibility)."""

from __future__ import annotations

from pathlib import Path


from lorastudio.core import runs


# the loss plot's series colours (tab_train), and app.CSS's dots on the eval-loss points
LOSS_COLORS = {"loss": "#3b82f6", "eval_loss": "#f97316"}


# ---------------------------------------------------------------- messages

def error_text(e: BaseException) -> str:
    """One readable line for the user: the message of our own errors, the type for the rest."""
    msg = str(e).strip() or type(e).__name__
    ours = ("ConfigError", "DataError", "TemplateError", "ModelError", "ConvertError", "ChatError", "ValueError",
            "FileNotFoundError", "AccessError", "WorkerError", "FileProblem", "LaunchError")
    if type(e).__name__ not in ours:
        msg = f"{type(e).__name__}: {msg}"
    return msg.splitlines()[0] if len(msg) > 2000 else msg


def err_md(e: BaseException | str) -> str:
    return f"**Error:** {e if isinstance(e, str) else error_text(e)}"


def whole(value, label: str, lo: int | None = None, hi: int | None = None) -> int:
    """A form's number as an int within [lo, hi], or ValueError naming the field (nan, inf, 2.5,
    1e300 and '' all arrive from the API)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label}: expected a whole number, got {value!r}") from None
    if f != f or f in (float("inf"), float("-inf")) or f != int(f):
        raise ValueError(f"{label}: expected a whole number, got {value!r}")
    n = int(f)
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        bounds = f"at least {lo}" if hi is None else f"at most {hi:,}" if lo is None else f"{lo} to {hi:,}"
        raise ValueError(f"{label}: {n:,} is out of range ({bounds})")
    return n


def number(value, label: str, lo: float | None = None, hi: float | None = None) -> float:
    """A form's number as a finite float within [lo, hi], or ValueError naming the field."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label}: expected a number, got {value!r}") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise ValueError(f"{label}: expected a finite number, got {value!r}")
    if (lo is not None and f < lo) or (hi is not None and f > hi):
        raise ValueError(f"{label}: {f:g} is out of range ({lo:g} to {hi:g})" if lo is not None and hi is not None
                         else f"{label}: {f:g} is out of range")
    return f


def readable(value: str | None) -> str:
    """A local path the browser may make this process read (core.access allow-list: the
    workspace, the launch folder, --allow-dir folders), resolved; builtin names and hub ids pass.
    Raises core.access.AccessError otherwise."""
    from lorastudio.core import access

    value = (value or "").strip()
    return access.check_readable(value) if value else value


def workspace_run(value: str | None) -> str:
    """A run directory of this workspace's runs/ folder, resolved (a bare run name is looked up
    there): the only runs the web app reads, signals, converts, chats with or deletes. A folder
    elsewhere with a run.json in it is somebody's files, not a run of this app."""
    from lorastudio.core import access, workspace

    value = (value or "").strip()
    if not value:
        raise ValueError("no run selected")
    path = Path(value).expanduser() if access.looks_like_path(value) else workspace.runs_dir() / value
    path = path.resolve()
    if not runs.in_workspace(path) or not (path / "run.json").is_file():
        raise access.AccessError(f"{value}: not a run of this workspace (runs live in {workspace.runs_dir()}); "
                                 "the app acts only on its own runs")
    return str(path)


# ---------------------------------------------------------------- presets and runs

def preset_names() -> list[str]:
    from lorastudio import presets

    return sorted(presets.preset_files())


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
    from lorastudio.core import worker

    try:
        src = {"path": readable(parse_sources(data)[0]["path"]), "format": "auto"}
        model = readable(model or "builtin:tiny")
        r = worker.call("preview", tokenizer=(model, False), model=model, source=src, template=template or "auto",
                        n=whole(n, "Samples", 1, 100), cutoff=None)
    except Exception as e:  # noqa: BLE001 - shown to the user as a message
        return [], err_md(e)
    pieces: list[tuple[str, str | None]] = []
    for i, s in enumerate(r["samples"]):
        pieces.append((f"\n--- sample {i + 1} ({s['n_tokens']} tokens, {s['n_trained']} trained) ---\n", None))
        pieces += highlight_pieces(s["text"], s["trained_spans"])
    return pieces, f"{len(r['samples'])} samples rendered"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")
