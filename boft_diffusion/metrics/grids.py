"""Grids of samples and the one-line tables of what a run taught."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from .dreambooth import Measurement
from .scorers import GUTTER, MetricsError

# --- grids and tables -----------------------------------------------------------------------------


def grid(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """Images of one size pasted into a row-major grid, ``GUTTER`` white pixels between cells.

    Rows may be ragged; the grid is as wide as the longest row and missing cells stay white.
    """
    rows = [list(row) for row in rows]
    cells = [image for row in rows for image in row]
    if not cells:
        raise MetricsError("grid needs at least one image")
    sizes = {image.size for image in cells}
    if len(sizes) > 1:
        raise MetricsError(f"grid images must share one size, got {sorted(sizes)}")
    (width, height), cols = cells[0].size, max(len(row) for row in rows)
    canvas = Image.new(
        "RGB", (cols * width + (cols - 1) * GUTTER, len(rows) * height + (len(rows) - 1) * GUTTER), "white"
    )
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas.paste(image.convert("RGB"), (c * (width + GUTTER), r * (height + GUTTER)))
    return canvas


def before_after_rows(before: Measurement | None, after: Measurement) -> list[list[Image.Image]]:
    """A row per prompt: its images before (if measured), then after (for :func:`grid`)."""
    return [[*(before.samples.get(p, []) if before else []), *images] for p, images in after.samples.items()]


def before_after_control_rows(before: Measurement | None, after: Measurement) -> list[list[Image.Image]]:
    """A row per control case of :func:`measure_control`: its condition once, then its samples before (if
    measured), then after (for :func:`grid`)."""
    rows = []
    for key, (condition, *images) in after.samples.items():
        earlier = before.samples.get(key, [])[1:] if before else []
        rows.append([condition, *earlier, *images])
    return rows


def format_metrics(
    before: dict[str, float | None] | None,
    after: dict[str, float | None],
    scorer: str,
    per_prompt: dict[str, dict[str, dict[str, float | None]] | None] | None = None,
) -> str:
    """The metrics as a small table: metric, before, after (``-`` where not measured); with
    ``per_prompt`` (``{"before": ..., "after": ...}`` of :attr:`Measurement.per_prompt`), each prompt's
    own values below it."""

    def cell(value: float | None) -> str:
        return "    -  " if value is None else f"{value:7.3f}"

    lines = [f"What it taught (scorer: {scorer}):", f"  {'metric':<18} {'before':>7} {'after':>7}"]
    lines += [f"  {name:<18} {cell((before or {}).get(name))} {cell(v)}" for name, v in after.items()]
    if per_prompt and per_prompt.get("after"):
        earlier = per_prompt.get("before") or {}
        lines.append("  per prompt:")
        for prompt, values in per_prompt["after"].items():
            lines += [
                f"  {name:<18} {cell(earlier.get(prompt, {}).get(name))} {cell(v)}  {prompt}"
                for name, v in values.items()
            ]
    return "\n".join(lines)
