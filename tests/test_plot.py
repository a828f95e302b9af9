"""The loss plot is a real PNG whose drawn line follows the curve."""

from __future__ import annotations

import io

from PIL import Image

from lora_assets.plot import HEIGHT, WIDTH, loss_curve_png, markdown_image


def _blue_pixels(png: bytes) -> list[tuple[int, int]]:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    return [(x, y) for x in range(img.width) for y in range(img.height) if img.getpixel((x, y)) == (31, 119, 180)]


def test_falling_curve_is_drawn_falling():
    png = loss_curve_png([(s, 10.0 / s) for s in range(1, 50)])
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == (WIDTH, HEIGHT)
    pts = _blue_pixels(png)
    left = [y for x, y in pts if x < WIDTH * 0.3]
    right = [y for x, y in pts if x > WIDTH * 0.7]
    assert left and right and min(left) < min(right)  # y grows downwards: high loss on the left


def test_empty_and_flat_curves_still_render():
    assert not _blue_pixels(loss_curve_png([]))
    assert _blue_pixels(loss_curve_png([(10, 1.0), (20, 1.0)]))
    assert markdown_image(b"\x89PNG", "x").startswith("![x](data:image/png;base64,")


def test_non_finite_losses_are_left_out():
    """The chart of a curve with NaN and infinite losses is, pixel for pixel, the chart of its finite points: they
    set neither the axes (steps 1 and 5 would widen them) nor the line."""
    nan, inf = float("nan"), float("inf")
    finite = loss_curve_png([(2, 3.0), (4, 2.0)])
    assert _blue_pixels(finite)  # the finite points are drawn, not an empty chart
    assert loss_curve_png([(1, nan), (2, 3.0), (3, inf), (4, 2.0), (5, -inf)]) == finite
    assert loss_curve_png([(1, nan), (2, inf)]) == loss_curve_png([])  # nothing finite: the "no loss logged" chart
