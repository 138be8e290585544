"""A line chart of a few series over time, stacked in panels, as SVG or PNG.

SVG is written by hand and needs nothing; PNG is drawn with Pillow (the `check` extra), the
lightest library that draws lines and text. One layout function draws on either canvas.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence, Tuple, Union
from xml.sax.saxutils import escape

Points = Sequence[Tuple[float, float]]
Panel = Tuple[str, Mapping[str, Points]]  # (y axis title, {series name: [(x, y)]})

WIDTH, PANEL_HEIGHT = 900, 260
LEFT, RIGHT, TOP, GAP, BOTTOM = 90, 160, 50, 50, 45
COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")
AXIS, GRID, INK = "#444444", "#e4e4e4", "#222222"
SUFFIXES = (".svg", ".png")


def needs_pillow(path: str) -> bool:
    return path.lower().endswith(".png")


def write(path: str, title: str, x_title: str, panels: Sequence[Panel]) -> None:
    """Draw `panels` one above the other, sharing the x axis, and save to `path` (.svg or .png;
    .png needs Pillow)."""
    height = TOP + len(panels) * (PANEL_HEIGHT + GAP) + BOTTOM - GAP
    canvas: Canvas = _PngCanvas(WIDTH, height) if needs_pillow(path) else _SvgCanvas(WIDTH, height)
    canvas.text(WIDTH / 2, 28, title, size=16, anchor="middle")
    x_values = [x for _, series in panels for points in series.values() for x, _ in points]
    x_ticks = nice_ticks(min(x_values, default=0.0), max(x_values, default=1.0))
    names: List[str] = []
    for _, series in panels:
        names += [name for name in series if name not in names]
    colors = {name: COLORS[i % len(COLORS)] for i, name in enumerate(names)}
    for i, (y_title, series) in enumerate(panels):
        top = TOP + i * (PANEL_HEIGHT + GAP)
        _panel(canvas, top, y_title, series, x_ticks, colors)
    bottom = TOP + len(panels) * (PANEL_HEIGHT + GAP) - GAP
    canvas.text(LEFT + (WIDTH - LEFT - RIGHT) / 2, bottom + 38, x_title, anchor="middle")
    for i, name in enumerate(names):
        y = TOP + 10 + i * 22
        canvas.line([(WIDTH - RIGHT + 20, y), (WIDTH - RIGHT + 45, y)], colors[name], 3)
        canvas.text(WIDTH - RIGHT + 52, y + 4, name)
    canvas.save(path)


def _panel(
    canvas: Canvas,
    top: float,
    y_title: str,
    series: Mapping[str, Points],
    x_ticks: List[float],
    colors: Dict[str, str],
) -> None:
    y_values = [y for points in series.values() for _, y in points]
    # From zero, so that a climb is seen against the whole, not magnified.
    y_ticks = nice_ticks(min([0.0, *y_values]), max(y_values, default=1.0))
    left, right, bottom = LEFT, WIDTH - RIGHT, top + PANEL_HEIGHT

    def at(x: float, y: float) -> Tuple[float, float]:
        fx = (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0])
        fy = (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0])
        return left + fx * (right - left), bottom - fy * (bottom - top)

    for y in y_ticks:
        _, py = at(x_ticks[0], y)
        canvas.line([(left, py), (right, py)], GRID, 1)
        canvas.text(left - 8, py + 4, _tick_label(y), anchor="end", size=11)
    for x in x_ticks:
        px, _ = at(x, y_ticks[0])
        canvas.line([(px, bottom), (px, bottom + 5)], AXIS, 1)
        canvas.text(px, bottom + 18, _tick_label(x), anchor="middle", size=11)
    canvas.line([(left, top), (left, bottom), (right, bottom)], AXIS, 1)
    canvas.text(left, top - 10, y_title, size=13)
    for name, points in series.items():
        if len(points) > 1:
            canvas.line([at(x, y) for x, y in points], colors[name], 2)


def nice_ticks(low: float, high: float, count: int = 5) -> List[float]:
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) covering
    [low, high]."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = [first]
    while ticks[-1] < high - step * 1e-9:
        ticks.append(first + len(ticks) * step)
    return ticks


def _tick_label(value: float) -> str:
    if value == int(value):
        return "{:,}".format(int(value))
    return "{:,.2f}".format(value).rstrip("0")


class _SvgCanvas:
    def __init__(self, width: int, height: int) -> None:
        self.parts = [
            '<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
            'viewBox="0 0 %d %d" font-family="Helvetica, Arial, sans-serif">'
            % (width, height, width, height),
            '<rect width="100%" height="100%" fill="white"/>',
        ]

    def line(self, points: Points, color: str, width: float) -> None:
        coords = " ".join("%.1f,%.1f" % point for point in points)
        self.parts.append(
            '<polyline points="%s" fill="none" stroke="%s" stroke-width="%s" '
            'stroke-linejoin="round"/>' % (coords, color, width)
        )

    def text(self, x: float, y: float, text: str, size: int = 12, anchor: str = "start") -> None:
        self.parts.append(
            '<text x="%.1f" y="%.1f" font-size="%d" fill="%s" text-anchor="%s">%s'
            "</text>" % (x, y, size, INK, anchor, escape(text))
        )

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(self.parts + ["</svg>"]) + "\n")


class _PngCanvas:
    ANCHORS = {"start": "ls", "middle": "ms", "end": "rs"}  # Pillow's: left/middle/right, baseline
    SCALE = 2  # drawn twice as large, then scaled down: Pillow's lines are not antialiased

    def __init__(self, width: int, height: int) -> None:
        from PIL import Image, ImageDraw, ImageFont

        self._fonts = ImageFont
        self.size = (width, height)
        self.image = Image.new("RGB", (width * self.SCALE, height * self.SCALE), "white")
        self.draw = ImageDraw.Draw(self.image)

    def line(self, points: Points, color: str, width: float) -> None:
        scaled = [(x * self.SCALE, y * self.SCALE) for x, y in points]
        self.draw.line(scaled, fill=color, width=int(width * self.SCALE), joint="curve")

    def text(self, x: float, y: float, text: str, size: int = 12, anchor: str = "start") -> None:
        font = self._fonts.load_default(size * self.SCALE)  # FreeType's own font: Pillow >= 10.1
        self.draw.text(
            (x * self.SCALE, y * self.SCALE), text, fill=INK, font=font, anchor=self.ANCHORS[anchor]
        )

    def save(self, path: str) -> None:
        from PIL import Image

        self.image.resize(self.size, Image.Resampling.LANCZOS).save(path, "PNG")


Canvas = Union[_SvgCanvas, _PngCanvas]
