"""The Dataset tab's token-length histogram: bins over the untruncated lengths (core.analysis
measures them before any cutoff), the cutoff drawn as a line, the truncated share written out.
Drawn as plain SVG: gr.BarPlot re-bins on its own axis and has no way to draw a rule at the
cutoff, and an empty one shows a "NaN" legend."""

from __future__ import annotations

import html
import math

BINS = 30
W, H = 860, 260  # viewBox; the SVG scales to the page's width
LEFT, RIGHT, TOP, BOTTOM = 52, 16, 30, 38
WITHIN, OVER = "#3b82f6", "#ef4444"


def _nice(raw: float) -> int:
    """The smallest 1/2/5 x 10^k at least RAW (bin widths and axis steps a reader can add up)."""
    if raw <= 1:
        return 1
    mag = 10 ** math.floor(math.log10(raw))
    return int(next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw))


def length_histogram(lengths: list[int], cutoff: int, bins: int = BINS) -> dict:
    """{"rows", "over", "share" (percent over the cutoff), "cutoff", "max", "width", "bins":
    [{"start", "end", "within", "over"}]}: each bin split into rows that fit the cutoff and rows
    the cutoff truncates. The x range covers both the longest row and the cutoff."""
    lengths = [int(n) for n in lengths]
    over = sum(n > cutoff for n in lengths)
    out = {"rows": len(lengths), "over": over, "share": 100 * over / len(lengths) if lengths else 0.0,
           "cutoff": int(cutoff), "max": max(lengths, default=0), "width": 1, "bins": []}
    if not lengths:
        return out
    width = _nice((max(out["max"], cutoff) + 1) / bins)
    counts: dict[int, list[int]] = {}
    for n in lengths:
        c = counts.setdefault(n // width, [0, 0])
        c[n > cutoff] += 1
    top = max(max(counts), cutoff // width)
    out["width"] = width
    out["bins"] = [{"start": i * width, "end": (i + 1) * width, "within": counts.get(i, [0, 0])[0],
                    "over": counts.get(i, [0, 0])[1]} for i in range(top + 1)]
    return out


def caption(h: dict) -> str:
    """The sentence under the histogram: how many rows the cutoff truncates."""
    if not h["rows"]:
        return ""
    if h["over"]:
        return (f"{h['share']:.1f}% of rows exceed the cutoff of {h['cutoff']:,} tokens: truncated "
                f"({h['over']:,} of {h['rows']:,}; the longest has {h['max']:,} tokens)")
    return f"Every row fits within the cutoff of {h['cutoff']:,} tokens (the longest has {h['max']:,})"


def empty_html(text: str) -> str:
    return f'<div class="hist-empty" id="length-hist-empty">{html.escape(text)}</div>'


def histogram_html(h: dict | None, empty: str = "No token lengths yet: press Analyze.") -> str:
    """The histogram as an SVG, or a plain sentence when there is nothing to draw (no analysis,
    an error, a single row)."""
    if not h or not h["rows"]:
        return empty_html(empty)
    if h["rows"] == 1:
        fits = "within" if not h["over"] else "over (truncated at)"
        return empty_html(f"One row of {h['max']:,} tokens, {fits} the cutoff of {h['cutoff']:,}: "
                          "too few rows for a histogram.")
    bins, width = h["bins"], h["width"]
    x_max = bins[-1]["end"]
    y_max = max(b["within"] + b["over"] for b in bins)
    y_top = _nice(y_max) if y_max > 10 else y_max
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    x = lambda v: LEFT + pw * v / x_max  # noqa: E731
    y = lambda v: TOP + ph * (1 - v / y_top)  # noqa: E731
    parts = [f'<svg id="length-hist-svg" viewBox="0 0 {W} {H}" width="100%" role="img" '
             f'aria-label="token length per row" xmlns="http://www.w3.org/2000/svg" '
             f'font-family="inherit" font-size="12" fill="currentColor">']
    for b in bins:
        bx, bw = x(b["start"]) + 0.5, max(pw * width / x_max - 1, 0.8)
        base = b["within"]
        for cls, lo, hi, color in (("within", 0, base, WITHIN), ("over", base, base + b["over"], OVER)):
            if hi > lo:
                parts.append(f'<rect class="bar {cls}" data-start="{b["start"]}" data-rows="{hi - lo}" '
                             f'x="{bx:.1f}" y="{y(hi):.1f}" width="{bw:.1f}" height="{y(lo) - y(hi):.1f}" '
                             f'fill="{color}"><title>{b["start"]:,}–{b["end"] - 1:,} tokens: {hi - lo:,} rows '
                             f'{"within the cutoff" if cls == "within" else "truncated"}</title></rect>')
    # axes: rows on the left, tokens along the bottom (about 8 labelled ticks)
    parts.append(f'<line x1="{LEFT}" y1="{TOP + ph}" x2="{LEFT + pw}" y2="{TOP + ph}" stroke="#9ca3af"/>')
    step = _nice(x_max / 8)
    for t in range(0, x_max + 1, step):
        parts.append(f'<text x="{x(t):.1f}" y="{TOP + ph + 16}" text-anchor="middle">{t:,}</text>')
    for t in sorted({0, y_top // 2, y_top}):
        parts.append(f'<text x="{LEFT - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t:,}</text>')
    parts.append(f'<text x="{LEFT + pw / 2}" y="{H - 4}" text-anchor="middle">tokens per row</text>')
    parts.append(f'<text x="12" y="{TOP + ph / 2}" text-anchor="middle" transform="rotate(-90 12 {TOP + ph / 2})">'
                 'rows</text>')
    cx = x(h["cutoff"])
    anchor = "end" if cx > LEFT + pw * 0.8 else "start"
    parts.append(f'<line class="cutoff" data-cutoff="{h["cutoff"]}" x1="{cx:.1f}" y1="{TOP - 8}" x2="{cx:.1f}" '
                 f'y2="{TOP + ph}" stroke="currentColor" stroke-width="2" stroke-dasharray="6 4"/>')
    parts.append(f'<text x="{cx + (4 if anchor == "start" else -4):.1f}" y="{TOP - 12}" text-anchor="{anchor}" '
                 f'font-weight="bold">cutoff {h["cutoff"]:,}</text>')
    for i, (label, color) in enumerate((("within cutoff", WITHIN), ("over cutoff (truncated)", OVER))):
        lx = LEFT + pw - 330 + i * 130
        parts.append(f'<rect x="{lx}" y="6" width="10" height="10" fill="{color}"/>'
                     f'<text x="{lx + 14}" y="15">{label}</text>')
    parts.append("</svg>")
    return (f'<div id="length-hist">{"".join(parts)}'
            f'<p class="hist-caption" id="length-hist-caption">{html.escape(caption(h))}</p></div>')
