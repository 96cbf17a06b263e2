"""What the commands share: the usage error, the scale flags as --set overrides, echoing a child's log."""

from __future__ import annotations

import sys
from pathlib import Path

EXIT_USAGE = 2


def err(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def scale_sets(a) -> list[str]:
    """--gpus/--strategy/--offload as config overrides (training.gpus, .strategy, .offload)."""
    out = []
    if getattr(a, "gpus", None) is not None:
        out.append(f"training.gpus={a.gpus}")
    if getattr(a, "strategy", None) is not None:
        out.append(f"training.strategy={a.strategy}")
    if getattr(a, "offload", False):
        out.append("training.offload=true")
    return out


def echo_from(log: Path, pos: int) -> int:
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
