"""Shipped presets (package data, so they exist in a non-editable install too)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def preset_files() -> dict[str, Path]:
    root = resources.files(__name__)
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def find(name: str) -> Path | None:
    return preset_files().get(name.removesuffix(".yaml"))
