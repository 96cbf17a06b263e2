"""Which local paths the web app may read. The CLI user owns their terminal and reads what they
like; a browser (possibly another user of a shared machine) may only read inside the workspace
and the folders allowed at launch (`lorastudio webui --allow-dir DIR`, repeatable).

Default allowed folders: the workspace ($LORASTUDIO_HOME) and the folder `lorastudio` was
started in. Names like builtin:tiny and hub ids are not paths and pass through."""

from __future__ import annotations

import os
from pathlib import Path

from . import workspace


class AccessError(PermissionError):
    pass


def default_allowed() -> list[Path]:
    return [workspace.home(), Path.cwd().resolve()]


def allowed_dirs() -> list[Path]:
    extra = [Path(p).expanduser().resolve() for p in os.environ.get("LORASTUDIO_ALLOW_DIRS", "").split(os.pathsep) if p]
    return default_allowed() + extra


def looks_like_path(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or os.sep in value and Path(value).expanduser().exists()


def check_readable(value: str, allowed: list[Path] | None = None) -> str:
    """Return `value` if it may be read; raise AccessError naming the allowed folders otherwise."""
    if not value or value.startswith("builtin:") or not looks_like_path(value):
        return value  # a builtin name or a hub id
    path = Path(value).expanduser().resolve()  # resolves symlinks and ../ tricks
    roots = allowed if allowed is not None else allowed_dirs()
    if any(path == r or r in path.parents for r in roots):
        return str(path)
    raise AccessError(f"{value}: outside the folders this app may read ({', '.join(map(str, roots))}); "
                      "restart with --allow-dir to add one")
