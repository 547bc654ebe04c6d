"""Histograms as PNG bytes, drawn with Pillow (already installed; no plotting stack needed).

The run report shows a few distributions (clip durations, decode confidence, SNR, ...): a grid
of plain histograms with ticks, a median and a count is all it needs, and Pillow draws that in a
few milliseconds with a palette PNG small enough to inline in an artifact as a data URL.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

PANEL_W, PANEL_H = 620, 340
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 24, 62, 50
BACKGROUND, INK, GRID, BAR, MEDIAN = "#ffffff", "#1f2328", "#d8dee4", "#4c78a8", "#e45756"


@dataclass(frozen=True)
class Panel:
    """One histogram: its values and how to label them."""

    title: str
    unit: str  # shown on the x axis; "" for unitless values
    values: Sequence[float]


def histogram_png(panels: Sequence[Panel], columns: int = 2, note: str = "") -> bytes:
    """A grid of histograms, `columns` wide, as PNG bytes; `note` is printed under the grid."""
    panels = [p for p in panels if p.values]
    if not panels:
        raise ValueError("nothing to plot: every panel is empty")
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    note_h = 28 if note else 0
    image = Image.new("RGB", (PANEL_W * columns, PANEL_H * rows + note_h), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i, panel in enumerate(panels):
        _draw_panel(draw, panel, (i % columns) * PANEL_W, (i // columns) * PANEL_H)
    if note:
        draw.text((12, PANEL_H * rows + 6), note, fill=INK, font=_font(14))
    # A palette keeps the PNG a few tens of kB, small enough to inline as a data URL.
    out = io.BytesIO()
    image.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(out, format="PNG", optimize=True)
    return out.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def bins_of(values: Sequence[float], max_bins: int = 30) -> tuple[list[float], list[int]]:
    """Equal-width bin edges over [min, max] and the count in each (the last bin is closed)."""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(5, min(max_bins, int(math.sqrt(len(values))) + 1))
    width = (hi - lo) / n
    counts = [0] * n
    for v in values:
        counts[min(n - 1, int((v - lo) / width))] += 1
    return [lo + i * width for i in range(n + 1)], counts


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten) covering [lo, hi]."""
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / target
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _draw_panel(draw: ImageDraw.ImageDraw, panel: Panel, x0: int, y0: int) -> None:
    values = sorted(panel.values)
    edges, counts = bins_of(values)
    left, right = x0 + MARGIN_L, x0 + PANEL_W - MARGIN_R
    top, bottom = y0 + MARGIN_T, y0 + PANEL_H - MARGIN_B
    top_count = max(counts)
    y_ticks = [t for t in nice_ticks(0, top_count * 1.1, 4) if t == int(t)]
    y_max = max(top_count * 1.1, y_ticks[-1])  # headroom: the tallest bar never touches the title

    def px(v: float) -> float:
        return left + (v - edges[0]) / (edges[-1] - edges[0]) * (right - left)

    def py(c: float) -> float:
        return bottom - c / y_max * (bottom - top)

    small, label = _font(12), _font(13)
    for t in y_ticks:
        draw.line([(left, py(t)), (right, py(t))], fill=GRID)
        _text(draw, (left - 6, py(t)), f"{int(t)}", small, anchor="rm")
    for i, c in enumerate(counts):
        if c:
            draw.rectangle([px(edges[i]) + 1, py(c), px(edges[i + 1]) - 1, bottom], fill=BAR)
    draw.line([(left, bottom), (right, bottom)], fill=INK)
    draw.line([(left, top), (left, bottom)], fill=INK)
    for t in nice_ticks(edges[0], edges[-1], 6):
        draw.line([(px(t), bottom), (px(t), bottom + 4)], fill=INK)
        _text(draw, (px(t), bottom + 6), _fmt(t), small, anchor="ma")
    median = _quantile(values, 0.5)
    draw.line([(px(median), top), (px(median), bottom)], fill=MEDIAN, width=2)
    _text(draw, (x0 + MARGIN_L, y0 + 12), panel.title, _font(17), anchor="la")
    stats = (f"n = {len(values):,}   median {_fmt(median)}   "
             f"p5 {_fmt(_quantile(values, 0.05))}   p95 {_fmt(_quantile(values, 0.95))}")
    _text(draw, (x0 + MARGIN_L, y0 + 36), stats, label, anchor="la", fill=MEDIAN)
    _text(draw, ((left + right) / 2, bottom + 26), panel.unit, label, anchor="ma")
    _text(draw, (x0 + 14, (top + bottom) / 2), "clips", small, anchor="lm")


def _text(draw, xy, text, font, anchor, fill=INK) -> None:
    draw.text(xy, text, fill=fill, font=font, anchor=anchor)


def _fmt(v: float) -> str:
    if v == int(v) and abs(v) < 1e6:
        return f"{int(v)}"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted sequence."""
    pos = q * (len(ordered) - 1)
    i = int(pos)
    j = min(i + 1, len(ordered) - 1)
    return ordered[i] + (ordered[j] - ordered[i]) * (pos - i)


_FONTS: dict[int, ImageFont.FreeTypeFont | ImageFont.ImageFont] = {}


def _font(size: int):
    # Pillow >= 10.1 ships a scalable default font (when built with FreeType, as the wheels are).
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]
