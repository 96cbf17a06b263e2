"""The one workspace: everything LoRA Studio writes lives under $LORASTUDIO_HOME."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path


def home() -> Path:
    """Workspace root. `$LORASTUDIO_HOME`, else ~/.lorastudio (never the source tree)."""
    root = Path(os.environ.get("LORASTUDIO_HOME") or Path.home() / ".lorastudio").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def cache_dir(*parts: str) -> Path:
    p = home().joinpath("cache", *parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def runs_dir() -> Path:
    p = home() / "runs"
    p.mkdir(parents=True, exist_ok=True)
    return p


def uploads_dir() -> Path:
    p = home() / "uploads"
    p.mkdir(parents=True, exist_ok=True)
    return p


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def copy_upload(path: str | os.PathLike) -> Path:
    """Copy a user file into the workspace by content hash (same content -> same path)."""
    src = Path(path)
    digest = file_sha256(src)
    dest = uploads_dir() / digest[:16] / safe_name(src.name)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    return dest


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, fallback: str = "unnamed") -> str:
    """A file/run name with no path separators, no leading dots, no traversal."""
    cleaned = _SAFE.sub("-", name).strip("-.")
    return cleaned[:100] or fallback
