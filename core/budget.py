"""The budget of one template render: steps, characters and time, counted by core.sandbox's
bounded environment (the one render of every chat template). A render past a bound raises
TemplateLimit naming it, before the memory is taken."""

from __future__ import annotations

import contextvars
import re
import time
from dataclasses import dataclass, field

from jinja2.sandbox import SecurityError

MAX_SOURCE_CHARS = 256 * 1024  # a chat template's source (the largest shipped ones are ~20 KB)
BASE_CHARS = 2_000_000  # plus 8 x the conversation's size: output and any one value
BASE_STEPS = 2_000_000  # plus 10 x the conversation's size
TIMEOUT_S = 10.0  # one conversation


class TemplateLimit(SecurityError):
    """A render went past one of its bounds (work, size, time)."""


@dataclass
class Budget:
    max_chars: int = BASE_CHARS
    max_steps: int = BASE_STEPS
    deadline: float = float("inf")
    steps: int = 0
    out_chars: int = 0
    sized: dict = field(default_factory=dict)  # id -> (container, size): one walk per value per render

    def tick(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.max_steps:
            raise TemplateLimit(f"the template did more than {self.max_steps:,} steps (loops, calls, filters): "
                                "it was stopped")
        if not self.steps & 1023 and time.monotonic() > self.deadline:
            raise TemplateLimit("the template took too long to render: it was stopped")

    def size(self, value) -> int:
        """size_of(value), walked once per object and render: templates can't change a list or
        dict (the immutable sandbox); the object is held here, so its id is not reused meanwhile."""
        if isinstance(value, str):
            return len(value)
        if not isinstance(value, (list, tuple, dict)):
            return size_of(value, self.max_chars) if isinstance(value, (set, frozenset)) else 1
        hit = self.sized.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        n = size_of(value, self.max_chars)
        if len(self.sized) < 100_000:
            self.sized[id(value)] = (value, n)
        return n

    def check_size(self, value, what: str = "a value") -> None:
        if self.size(value) > self.max_chars:
            raise TemplateLimit(f"{what} would exceed {self.max_chars:,} characters: it was stopped")


# compile-time constant folding (no render running) gets the default bounds
BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("lorastudio_template_budget", default=None)


def current() -> Budget:
    return BUDGET.get() or Budget()


def size_of(value, limit: int) -> int:
    """Characters a value stands for: a string's length; a container's elements, each counted
    every time it appears (a list holding itself twice, forty levels deep, is 2**40). Stops
    counting past `limit`, so a huge value costs `limit` steps at most."""
    total = 0
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 1
            stack.extend(v)
        elif isinstance(v, dict):
            total += 1
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, int) and not isinstance(v, bool):
            total += 1 + v.bit_length() // 64
        else:
            total += 1
        if total > limit:
            return total
    return total


def check_big_int(b: Budget, args, kwargs) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > b.max_chars:
            raise TemplateLimit(f"an argument of {v:,} is over the template limit ({b.max_chars:,})")


# a format width (or precision) of a million or more: '%9999999s', '{:>9999999}'
PCT_WIDTH = re.compile(r"%[-#0 +]*(\d{7,}|\d*\.\d{7,})")
FMT_WIDTH = re.compile(r"\{[^{}]*:[^{}]*\d{7,}[^{}]*\}")


def grows_to(b: Budget, func_name: str, base, args, kwargs) -> int | None:
    """A cheap estimate of the result size of the string functions that can multiply their input."""
    if not isinstance(base, str):
        return None
    a = list(args) + list(kwargs.values())
    if func_name == "replace" and len(a) >= 2 and isinstance(a[0], str) and isinstance(a[1], str):
        hits = len(base) + 1 if a[0] == "" else base.count(a[0])
        return len(base) + hits * max(0, len(a[1]) - len(a[0]))
    if func_name == "join":
        items = a[0] if a else ()
        n = len(items) if hasattr(items, "__len__") else 0
        return len(base) * n
    if func_name == "expandtabs":
        return len(base) + base.count("\t") * (a[0] if a and isinstance(a[0], int) else 8)
    if func_name == "indent":
        width = a[0] if a else 4
        pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 4
        return len(base) + (base.count("\n") + 1) * pad
    if func_name == "wordwrap":
        wrap = kwargs.get("wrapstring") or (a[3] if len(a) > 3 else None)
        return len(base) * (1 + (len(wrap) if isinstance(wrap, str) else 1))
    if func_name in ("format", "format_map") and FMT_WIDTH.search(base):
        return b.max_chars + 1
    if func_name == "format_filter" and PCT_WIDTH.search(base):
        return b.max_chars + 1
    return None
