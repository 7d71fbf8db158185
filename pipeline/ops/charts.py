"""Small charts rendered on the server as inline SVG: no JavaScript, no CDN, no internet.

Why hand-written rather than a library: the dashboard needs two chart types (grouped bars and
one line) on a staff page that must work offline and under a strict Content-Security-Policy.
Chart.js would add a JavaScript bundle, a client-side data feed and a script exception to the
policy; pygal would add a dependency whose SVG carries its own scripts and styles, to replace
about 150 lines that have tests and no open bugs. We keep these; if the dashboard grows
beyond a few chart types, pygal is the one to take.

Each function returns a `<figure>` holding an accessible SVG (a title, one `<title>` tooltip per
mark with the exact number) and a legend. Colours come from CSS classes (`series-0`, ...) in
`static/css/app.css`; every piece of text is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

Number = float | int | Decimal
Formatter = Callable[[float], str]

_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 12, 12, 26
_TICKS = 4
_MAX_X_LABELS = 10


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[Number]
    tone: str = ""  # a colour by meaning ("ok", "bad", "warn"); by position when empty

    def css(self, index: int) -> str:
        return f"series-{self.tone or index}"


def compact(value: float) -> str:
    """1234 -> "1.2k", 3_400_000 -> "3.4M", 0.5 -> "0.5"."""
    for bound, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= bound:
            return f"{value / bound:.1f}".rstrip("0").rstrip(".") + suffix
    return f"{value:.2f}".rstrip("0").rstrip(".") or "0"


def dollars(value: float) -> str:
    if value == 0:
        return "$0"
    return f"${value:,.2f}" if abs(value) >= 1 else f"${value:.4f}"


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `value` (1 for 0)."""
    if value <= 0:
        return 1.0
    power: float = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value * (1 - 1e-9):
            return step * power
    return 10 * power  # pragma: no cover - the loop always returns


def _frame(
    labels: Sequence[str], top: float, *, width: int, height: int, title: str, fmt: Formatter
) -> list[str]:
    """The SVG opening, horizontal grid lines with y labels, and the x labels."""
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    parts = [
        f'<svg class="chart-svg" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}" preserveAspectRatio="xMidYMid meet">'
        f"<title>{escape(title)}</title>"
    ]
    for i in range(_TICKS + 1):
        value = top * i / _TICKS
        y = _TOP + plot_h - plot_h * i / _TICKS
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(fmt(value))}</text>"
        )
    if labels:
        band = plot_w / len(labels)
        step = math.ceil(len(labels) / _MAX_X_LABELS)
        for i, label in enumerate(labels):
            if i % step == 0:
                x = _LEFT + band * (i + 0.5)
                parts.append(
                    f'<text class="tick" x="{x:.1f}" y="{height - 8}" text-anchor="middle">'
                    f"{escape(label)}</text>"
                )
    return parts


def _figure(svg: list[str], series: Sequence[Series], *, title: str, empty: bool) -> SafeString:
    legend = "".join(
        f'<span class="key"><i class="swatch {s.css(i)}"></i>{escape(s.name)}</span>'
        for i, s in enumerate(series)
    )
    note = '<span class="muted">no data in this window</span>' if empty else ""
    return mark_safe(  # noqa: S308 - every interpolated text above went through escape()
        f'<figure class="chart">{"".join(svg)}</svg>'
        f"<figcaption><strong>{escape(title)}</strong> {legend} {note}</figcaption></figure>"
    )


def bar_chart(
    labels: Sequence[str],
    series: Sequence[Series],
    *,
    title: str,
    fmt: Formatter = compact,
    width: int = 1000,
    height: int = 220,
) -> SafeString:
    """Vertical bars, one per label; several series are stacked bottom to top."""
    totals = [sum(float(s.values[i]) for s in series) for i in range(len(labels))]
    top = nice_ceiling(max(totals, default=0))
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    svg = _frame(labels, top, width=width, height=height, title=title, fmt=fmt)
    band = plot_w / max(len(labels), 1)
    bar = max(band * 0.7, 1.0)
    for i, label in enumerate(labels):
        x = _LEFT + band * i + (band - bar) / 2
        base: float = _TOP + plot_h
        for k, s in enumerate(series):
            value = float(s.values[i])
            if value <= 0:
                continue
            h = plot_h * value / top
            base -= h
            svg.append(
                f'<rect class="{s.css(k)}" x="{x:.1f}" y="{base:.1f}" '
                f'width="{bar:.1f}" height="{h:.1f}">'
                f"<title>{escape(label)} · {escape(s.name)}: {escape(fmt(value))}</title></rect>"
            )
    return _figure(svg, series, title=title, empty=not any(totals))


def line_chart(
    labels: Sequence[str],
    values: Sequence[Number],
    *,
    title: str,
    name: str,
    fmt: Formatter = compact,
    width: int = 1000,
    height: int = 200,
) -> SafeString:
    """One series as a line with a dot per point."""
    floats = [float(v) for v in values]
    top = nice_ceiling(max(floats, default=0))
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    svg = _frame(labels, top, width=width, height=height, title=title, fmt=fmt)
    band = plot_w / max(len(labels), 1)
    points = [
        (_LEFT + band * (i + 0.5), _TOP + plot_h - plot_h * v / top) for i, v in enumerate(floats)
    ]
    if len(points) > 1:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        svg.append(f'<polyline class="line series-0" points="{path}"/>')
    for (x, y), label, value in zip(points, labels, floats, strict=True):
        svg.append(
            f'<circle class="dot series-0" cx="{x:.1f}" cy="{y:.1f}" r="3">'
            f"<title>{escape(label)} · {escape(name)}: {escape(fmt(value))}</title></circle>"
        )
    return _figure(svg, [Series(name, floats)], title=title, empty=not any(floats))
