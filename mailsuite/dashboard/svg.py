"""Small SVG charts rendered on the server: a bar chart (one or more series side by side) and a
line chart. The output is a self-contained `<svg>` element to put inline in the page: no script,
no external file, no font but the browser's sans-serif.

Every bar is a `<rect class="bar s<series>" data-value="N">` with a `<title>` ("label: N") that a
browser shows on hover; tests read `data-value`. All text is escaped; numbers are rounded to one
decimal so that the same data always gives the same bytes.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Sequence

# Colours of series 0, 1, 2...: distinguishable for the common forms of colour blindness.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
WIDTH, HEIGHT = 720, 220
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 48, 12, 28, 44


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float]


def bar_chart(title: str, labels: Sequence[str], series: Sequence[Series],
              label_every: int = 1, width: int = WIDTH, height: int = HEIGHT) -> str:
    """Bars for labels[i] of every series, side by side; x labels shown every `label_every`."""
    _check(labels, series)
    frame = _Frame(title, width, height, _nice_max(series))
    slot = frame.plot_width / max(1, len(labels))
    bar = slot * 0.8 / max(1, len(series))
    parts = frame.open(series)
    for i, label in enumerate(labels):
        x0 = frame.left + i * slot + slot * 0.1
        for k, s in enumerate(series):
            value = s.values[i]
            h = frame.scale(value)
            parts.append(
                f'<rect class="bar s{k}" data-value="{_num(value)}" x="{_num(x0 + k * bar)}" '
                f'y="{_num(frame.bottom - h)}" width="{_num(max(bar - 1, 1))}" '
                f'height="{_num(h)}" fill="{PALETTE[k % len(PALETTE)]}">'
                f'<title>{_esc(label)}{_esc(" " + s.name if len(series) > 1 else "")}: '
                f'{_num(value)}</title></rect>')
        if i % max(1, label_every) == 0:
            parts.append(frame.x_label(frame.left + (i + 0.5) * slot, label))
    return frame.close(parts)


def line_chart(title: str, labels: Sequence[str], series: Sequence[Series],
               label_every: int = 1, width: int = WIDTH, height: int = HEIGHT) -> str:
    """One polyline per series through the points of labels[i]."""
    _check(labels, series)
    frame = _Frame(title, width, height, _nice_max(series))
    step = frame.plot_width / max(1, len(labels))
    parts = frame.open(series)
    for k, s in enumerate(series):
        points = " ".join(f"{_num(frame.left + (i + 0.5) * step)},"
                          f"{_num(frame.bottom - frame.scale(v))}" for i, v in enumerate(s.values))
        parts.append(f'<polyline class="line s{k}" fill="none" stroke-width="2" '
                     f'stroke="{PALETTE[k % len(PALETTE)]}" points="{points}">'
                     f'<title>{_esc(s.name)}: total {_num(sum(s.values))}</title></polyline>')
    for i, label in enumerate(labels):
        if i % max(1, label_every) == 0:
            parts.append(frame.x_label(frame.left + (i + 0.5) * step, label))
    return frame.close(parts)


class _Frame:
    """Title, axes, the y scale with its grid lines, and the legend."""

    def __init__(self, title: str, width: int, height: int, top_value: float):
        self.title = title
        self.width, self.height = width, height
        self.left, self.right = MARGIN_LEFT, width - MARGIN_RIGHT
        self.top, self.bottom = MARGIN_TOP, height - MARGIN_BOTTOM
        self.plot_width = self.right - self.left
        self.top_value = top_value

    def scale(self, value: float) -> float:
        return max(0.0, value) / self.top_value * (self.bottom - self.top)

    def open(self, series: Sequence[Series]) -> list[str]:
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{self.width}" '
                 f'height="{self.height}" viewBox="0 0 {self.width} {self.height}" role="img" '
                 f'aria-label="{_esc(self.title)}" font-family="sans-serif" font-size="11">',
                 f'<title>{_esc(self.title)}</title>',
                 f'<text x="{self.left}" y="16" font-size="13" font-weight="bold">'
                 f'{_esc(self.title)}</text>']
        for fraction in (0.0, 0.5, 1.0):
            y = self.bottom - fraction * (self.bottom - self.top)
            parts.append(f'<line x1="{self.left}" y1="{_num(y)}" x2="{self.right}" '
                         f'y2="{_num(y)}" stroke="#ddd"/>')
            parts.append(f'<text x="{self.left - 4}" y="{_num(y + 4)}" text-anchor="end">'
                         f'{_num(self.top_value * fraction)}</text>')
        if len(series) > 1:
            x = self.right
            for k, s in reversed(list(enumerate(series))):
                x -= 8 + 7 * len(s.name)
                parts.append(f'<rect x="{x}" y="7" width="10" height="10" '
                             f'fill="{PALETTE[k % len(PALETTE)]}"/>'
                             f'<text x="{x + 13}" y="16">{_esc(s.name)}</text>')
                x -= 14
        return parts

    def x_label(self, x: float, label: str) -> str:
        return (f'<text x="{_num(x)}" y="{self.bottom + 14}" text-anchor="middle">'
                f'{_esc(label)}</text>')

    def close(self, parts: list[str]) -> str:
        parts.append(f'<line x1="{self.left}" y1="{self.bottom}" x2="{self.right}" '
                     f'y2="{self.bottom}" stroke="#888"/>')
        parts.append("</svg>")
        return "".join(parts)


def _check(labels: Sequence[str], series: Sequence[Series]) -> None:
    for s in series:
        if len(s.values) != len(labels):
            raise ValueError(f"series {s.name!r} has {len(s.values)} values for "
                             f"{len(labels)} labels")


def _nice_max(series: Sequence[Series]) -> float:
    """The top of the y axis: the largest value rounded up to 1, 2 or 5 times a power of ten
    (at least 2, so that an empty chart still has an axis and its middle line is a whole
    number)."""
    largest = max((v for s in series for v in s.values), default=0)
    if largest <= 2:
        return 2.0
    power = 10 ** math.floor(math.log10(largest))
    for step in (1, 2, 5, 10):
        if largest <= step * power:
            return float(step * power)
    return float(10 * power)  # pragma: no cover - the loop always returns


def _num(value: float) -> str:
    rounded = round(float(value), 1)
    return str(int(rounded)) if rounded == int(rounded) else str(rounded)


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)
