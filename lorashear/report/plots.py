"""Plots of the pruning report, drawn as inline SVG (and summarised as text for Markdown).

The report must open anywhere as a single file, so the plots are plain SVG strings built
here: no matplotlib, no JavaScript. Each plot is a small dataclass holding its data, title
and axis labels; :func:`render_svg` draws it and :func:`summarize` says the same in words.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from html import escape

#: fill colours of successive series (colour-blind friendly)
PALETTE = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377")
WIDTH, HEIGHT = 640, 320
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 52, 56


@dataclass
class BarChart:
    """Stacked bars, one per category; ``series`` is [(name, one value per category)]."""

    title: str
    x_label: str
    y_label: str
    categories: list[str]
    series: list[tuple[str, list[float]]]


@dataclass
class Histogram:
    """The distribution of ``values`` over ``bins`` equal-width bins."""

    title: str
    x_label: str
    values: list[float]
    bins: int = 20
    y_label: str = "count"


@dataclass
class LineChart:
    """Lines through points; ``series`` is [(name, xs, ys)]."""

    title: str
    x_label: str
    y_label: str
    series: list[tuple[str, list[float], list[float]]] = field(default_factory=list)


Plot = BarChart | Histogram | LineChart


def histogram_counts(values: list[float], bins: int) -> tuple[list[float], list[int]]:
    """(bin edges, counts): ``bins`` equal bins over [min, max]; one bin when all are equal."""
    low, high = min(values), max(values)
    if high == low:
        return [low, high], [len(values)]
    width = (high - low) / bins
    counts = [0] * bins
    for v in values:
        counts[min(int((v - low) / width), bins - 1)] += 1
    return [low + i * width for i in range(bins + 1)], counts


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (steps of 1, 2 or 5 times a power of ten)."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks, t = [], first
    while t <= high + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < high:
        ticks.append(round(t, 12))
    return ticks


def format_number(value: float) -> str:
    """Compact tick and summary text: integers plain, others to 4 significant digits."""
    if float(value).is_integer() and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"


class _Canvas:
    """An SVG document with a plot area mapped from data coordinates."""

    def __init__(self, title: str, x_label: str, y_label: str) -> None:
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
                      f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
                      'font-family="sans-serif" font-size="11">',
                      f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
                      f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14" '
                      f'font-weight="bold">{escape(title)}</text>',
                      f'<text x="{LEFT + self.plot_width / 2}" y="{HEIGHT - 8}" '
                      f'text-anchor="middle" font-size="12">{escape(x_label)}</text>',
                      f'<text x="16" y="{TOP + self.plot_height / 2}" text-anchor="middle" '
                      f'font-size="12" transform="rotate(-90 16 {TOP + self.plot_height / 2})">'
                      f'{escape(y_label)}</text>']

    plot_width = WIDTH - LEFT - RIGHT
    plot_height = HEIGHT - TOP - BOTTOM

    def y_axis(self, low: float, high: float) -> None:
        """Horizontal grid lines with tick labels; sets the y mapping to the ticks' range."""
        ticks = nice_ticks(low, high)
        self.y_low, self.y_high = ticks[0], ticks[-1]
        for t in ticks:
            y = self.y(t)
            self.parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
                              'stroke="#ddd"/>')
            self.parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                              f'{format_number(t)}</text>')
        self.parts.append(f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + self.plot_height}" '
                          'stroke="black"/>')
        self.parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + self.plot_height}" '
                          f'y2="{TOP + self.plot_height}" stroke="black"/>')

    def y(self, value: float) -> float:
        span = (self.y_high - self.y_low) or 1.0
        return TOP + self.plot_height * (1 - (value - self.y_low) / span)

    def x_label_at(self, x: float, text: str) -> None:
        self.parts.append(f'<text x="{x:.1f}" y="{TOP + self.plot_height + 16}" '
                          f'text-anchor="middle">{escape(text)}</text>')

    def legend(self, names: list[str]) -> None:
        if len(names) < 2:
            return
        x, y = LEFT, TOP - 22  # one row between the title and the plot area, clear of the data
        for i, name in enumerate(names):
            self.parts.append(f'<rect x="{x}" y="{y}" width="10" height="10" '
                              f'fill="{PALETTE[i % len(PALETTE)]}"/>')
            self.parts.append(f'<text x="{x + 14}" y="{y + 9}">{escape(name)}</text>')
            x += 24 + 7 * len(name)

    def done(self) -> str:
        return "\n".join([*self.parts, "</svg>"])


def _bar_chart(plot: BarChart) -> str:
    canvas = _Canvas(plot.title, plot.x_label, plot.y_label)
    totals = [sum(values[i] for _, values in plot.series) for i in range(len(plot.categories))]
    canvas.y_axis(min(0.0, *totals) if totals else 0.0, max(totals, default=1.0))
    slot = canvas.plot_width / max(1, len(plot.categories))
    label_every = max(1, math.ceil(len(plot.categories) / 16))
    for i, category in enumerate(plot.categories):
        x = LEFT + slot * i + slot * 0.15
        base = 0.0
        for s, (name, values) in enumerate(plot.series):
            top = base + values[i]
            y_top, y_base = canvas.y(top), canvas.y(base)
            canvas.parts.append(
                f'<rect x="{x:.1f}" y="{min(y_top, y_base):.1f}" width="{slot * 0.7:.1f}" '
                f'height="{abs(y_base - y_top):.1f}" fill="{PALETTE[s % len(PALETTE)]}">'
                f'<title>{escape(category)} {escape(name)}: {format_number(values[i])}</title></rect>')
            base = top
        if i % label_every == 0:
            canvas.x_label_at(LEFT + slot * (i + 0.5), category)
    canvas.legend([name for name, _ in plot.series])
    return canvas.done()


def _histogram(plot: Histogram) -> str:
    canvas = _Canvas(plot.title, plot.x_label, plot.y_label)
    edges, counts = histogram_counts(plot.values, plot.bins)
    canvas.y_axis(0, max(counts))
    width = canvas.plot_width / len(counts)
    for i, count in enumerate(counts):
        y = canvas.y(count)
        canvas.parts.append(
            f'<rect x="{LEFT + width * i:.1f}" y="{y:.1f}" width="{max(width - 1, 1):.1f}" '
            f'height="{TOP + canvas.plot_height - y:.1f}" fill="{PALETTE[0]}">'
            f'<title>[{format_number(edges[i])}, {format_number(edges[i + 1])}]: {count}</title></rect>')
    for i in sorted({0, len(edges) // 2, len(edges) - 1}):
        canvas.x_label_at(LEFT + width * i if len(counts) > 1 else LEFT + canvas.plot_width * i,
                          format_number(edges[i]))
    return canvas.done()


def _line_chart(plot: LineChart) -> str:
    canvas = _Canvas(plot.title, plot.x_label, plot.y_label)
    xs = [x for _, series_x, _ in plot.series for x in series_x]
    ys = [y for _, _, series_y in plot.series for y in series_y]
    canvas.y_axis(min(ys), max(ys))
    x_low, x_high = min(xs), max(xs)
    x_span = (x_high - x_low) or 1.0

    def x_of(value: float) -> float:
        return LEFT + canvas.plot_width * (value - x_low) / x_span

    for s, (name, series_x, series_y) in enumerate(plot.series):
        colour = PALETTE[s % len(PALETTE)]
        points = " ".join(f"{x_of(x):.1f},{canvas.y(y):.1f}" for x, y in zip(series_x, series_y))
        canvas.parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" '
                            'stroke-width="2"/>')
        for x, y in zip(series_x, series_y):
            canvas.parts.append(f'<circle cx="{x_of(x):.1f}" cy="{canvas.y(y):.1f}" r="2.5" '
                                f'fill="{colour}"><title>{escape(name)} at {format_number(x)}: '
                                f'{format_number(y)}</title></circle>')
    whole = all(float(x).is_integer() for x in xs)  # steps and periods: no 1.5th step
    for tick in nice_ticks(x_low, x_high):
        if x_low <= tick <= x_high and (not whole or float(tick).is_integer()):
            canvas.x_label_at(x_of(tick), format_number(tick))
    canvas.legend([name for name, _, _ in plot.series])
    return canvas.done()


def render_svg(plot: Plot) -> str:
    """The plot as a standalone ``<svg>`` element with title and axis labels."""
    if isinstance(plot, BarChart):
        return _bar_chart(plot)
    if isinstance(plot, Histogram):
        return _histogram(plot)
    return _line_chart(plot)


def summarize(plot: Plot) -> list[str]:
    """The plot in words, for Markdown: its title and the numbers a reader would look for."""
    head = f"**{plot.title}** ({plot.x_label} vs {plot.y_label})"
    if isinstance(plot, BarChart):
        lines = [head]
        for i, category in enumerate(plot.categories):
            parts = ", ".join(f"{name} {format_number(values[i])}" for name, values in plot.series)
            lines.append(f"- {category}: {parts}")
        return lines
    if isinstance(plot, Histogram):
        edges, counts = histogram_counts(plot.values, plot.bins)
        return [head, f"- {len(plot.values)} values, min {format_number(min(plot.values))}, "
                f"median {format_number(statistics.median(plot.values))}, "
                f"max {format_number(max(plot.values))}",
                "- counts per bin from low to high: " + " ".join(str(c) for c in counts)]
    lines = [head]
    for name, xs, ys in plot.series:
        low = min(range(len(ys)), key=ys.__getitem__)
        lines.append(f"- {name}: {len(ys)} points, first {format_number(ys[0])} "
                     f"(at {format_number(xs[0])}), last {format_number(ys[-1])} "
                     f"(at {format_number(xs[-1])}), min {format_number(ys[low])} "
                     f"(at {format_number(xs[low])})")
    return lines
