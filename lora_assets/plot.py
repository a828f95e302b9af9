"""A loss curve as a small PNG, drawn with Pillow (no plotting library needed).

The training asset shows it in the Dagster UI as a markdown image; the same file is kept next to the adapter.
"""

from __future__ import annotations

import base64
import io
import math

WIDTH, HEIGHT = 640, 320
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 28, 40


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def loss_curve_png(curve: list[tuple[int, float]], title: str = "training loss") -> bytes:
    """PNG bytes of ``curve`` (step, loss) as a line chart with labelled axes.

    An empty curve gives a chart that says so, so the UI never shows a broken image.
    """
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, y0, x1, y1 = MARGIN_LEFT, MARGIN_TOP, WIDTH - MARGIN_RIGHT, HEIGHT - MARGIN_BOTTOM
    draw.text((x0, 6), title, fill="black", font=font)
    draw.rectangle((x0, y0, x1, y1), outline="#888888")
    curve = [(s, v) for s, v in curve if math.isfinite(v)]  # a NaN or inf loss must not lose the run
    if not curve:
        draw.text(
            (x0 + 10, (y0 + y1) // 2), "no loss logged (run shorter than one logging interval)", fill="black", font=font
        )
        return _encode(img)

    steps = [s for s, _ in curve]
    losses = [v for _, v in curve]
    s_lo, s_hi = min(steps), max(steps)
    l_lo, l_hi = min(losses), max(losses)
    pad = (l_hi - l_lo) * 0.05 or max(abs(l_hi) * 0.05, 1e-3)
    l_lo, l_hi = (max(l_lo - pad, 0.0) if l_lo >= 0 else l_lo - pad), l_hi + pad
    s_span = (s_hi - s_lo) or 1

    def xy(step: float, loss: float) -> tuple[float, float]:
        return (x0 + (step - s_lo) / s_span * (x1 - x0), y1 - (loss - l_lo) / (l_hi - l_lo) * (y1 - y0))

    for v in _ticks(l_lo, l_hi):
        _, y = xy(s_lo, v)
        draw.line((x0, y, x1, y), fill="#eeeeee")
        draw.text((4, y - 6), f"{v:.3g}", fill="black", font=font)
    for s in _ticks(s_lo, s_hi):
        x, _ = xy(s, l_lo)
        draw.text((x - 8, y1 + 6), f"{s:.0f}", fill="black", font=font)
    draw.text(((x0 + x1) // 2 - 12, HEIGHT - 16), "step", fill="black", font=font)
    points = [xy(s, v) for s, v in curve]
    if len(points) > 1:
        draw.line(points, fill="#1f77b4", width=2)
    for x, y in points:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill="#1f77b4")
    return _encode(img)


def _encode(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    """The PNG inlined as a markdown image (data URI), the form Dagster's UI renders in md metadata."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
