"""Shipped presets (package data, so they exist in a non-editable install too)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

if __name__ != "lorastudio.presets":  # one module, one name: never a second copy as `presets`
    raise ImportError(f"import lorastudio.presets, not {__name__} (the checkout installs as lorastudio: pip install -e .)")


def preset_files() -> dict[str, Path]:
    root = resources.files(__name__)
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def find(name: str) -> Path | None:
    return preset_files().get(name.removesuffix(".yaml"))


def resolve(arg: str) -> Path:
    """A config argument: an existing file, else a shipped preset by name (`tiny_demo`,
    `tiny_demo.yaml`, `presets/tiny_demo.yaml` from outside the checkout), else the path as given
    (loading it then names the missing file)."""
    p = Path(arg)
    if p.exists():
        return p
    found = find(arg) or (find(p.name) if p.parent.name == "presets" else None)
    return found or p
