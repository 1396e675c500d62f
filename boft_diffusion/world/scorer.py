"""The world scorer: read a scene's attributes and condition maps back from its pixels.

This world's analogue of DINO / CLIP scores: deterministic, no weights, a few milliseconds an image.

1. Background. The image border (``MARGIN`` keeps objects off it) gives the background's tones: one
   for a plain background, a light and a dark one (``dark = TEXTURE_SHADE · light``) for a texture.
   The background colour is the named colour nearest the light tone.
2. Object mask. Every pixel's distance ``d`` to the background's tones (to the RGB segment between
   them, which also holds their blurred mixtures) separates object from background. The object's
   colour ``o`` is the median of the pixels far from the background (``d > CORE_DISTANCE``); a pixel
   belongs to the object when ``d > d(o) / 2``: for an anti-aliased edge ``p = a o + (1 - a) b`` this
   is coverage ``a > 1/2``, the renderer's own rule. Isolated pixels (noise) are dropped. Then each
   pixel along the outline is decided by the coverage of the (object colour, background tone) mix that
   explains it best, which also catches mixes lying near the tones' segment (black over a light tone).
3. Texture. The background pixels' tone map is fitted by stripes and checkerboards of every phase;
   a texture that explains under ``PATTERN_AGREEMENT`` of them is speckled.
4. Colour, shape, size. The colour is the named colour nearest the median of the mask's interior (the
   subject's two stripe colours read as ``"striped"``). Each shape's template, rendered by the scene
   renderer's own geometry at the scale and place that fit the mask's box, is compared with the mask;
   the best intersection over union names the shape, and its radius the size class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from .scenes import (
    BACKGROUND_COLOURS,
    COLOURS,
    MARGIN,
    SHAPES,
    SIZE_RADII,
    SUBJECT_COLOUR,
    SUBJECT_STRIPES,
    Scene,
    mask_box,
    mask_edges,
    shape_extent,
    shape_mask,
    texture_period,
)

__all__ = [
    "ATTRIBUTES",
    "Reading",
    "aligned_tones",
    "attribute_accuracy",
    "colour_distance",
    "edge_f1",
    "mask_iou",
    "score_image",
]

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "background", "texture")
"""What :func:`attribute_accuracy` compares between a :class:`Reading` and its :class:`Scene`."""
CORE_DISTANCE = 35.0
"""RGB distance from the background's tones beyond which a pixel is surely object (the closest
object colour to a background is ~70 away; noise of sigma 8 per channel rarely reaches 35)."""
TWO_TONE_DISTANCE = 35.0
"""Border tones further apart than this make the background textured."""
PATTERN_AGREEMENT = 0.85
"""Fraction of background pixels a stripe / checker pattern must explain; below it, speckled."""
STRIPE_MATCH = 70.0
"""Distance within which an object's two colour clusters match the subject's stripe colours."""


@dataclass(frozen=True)
class Reading:
    """What the scorer saw. ``colour``, ``shape``, ``size`` are ``None`` when no object was found.

    ``mask``, ``edges``: bool ``(H, W)``; ``box``: ``(x0, y0, x1, y1)`` exclusive ends (or ``None``);
    ``centre``: the box centre as fractions of the width and height; ``rgb``: the object's median colour.
    ``confidence``: intersection over union of the mask and the best shape template, in ``[0, 1]``.
    ``colours``: the object's colours as read, one RGB for a solid object, two for a two-tone one
    (the subject's stripes); empty when no object was found.
    """

    colour: str | None
    shape: str | None
    size: str | None
    background: str
    texture: str
    mask: np.ndarray
    edges: np.ndarray
    box: tuple[int, int, int, int] | None
    centre: tuple[float, float] | None
    rgb: tuple[int, int, int] | None
    confidence: float
    colours: tuple[tuple[int, int, int], ...] = ()

    @property
    def is_subject(self) -> bool:
        """Whether this reads as the DreamBooth subject (the striped star)."""
        return self.colour == SUBJECT_COLOUR and self.shape == "star"


@dataclass(frozen=True)
class _Background:
    light: np.ndarray  # (3,) float
    dark: np.ndarray  # (3,) float; equals light when plain
    name: str
    textured: bool


def _as_rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    """float64 ``(H, W, 3)`` in ``[0, 255]`` from a PIL image, uint8 array or float array in ``[0, 1]``.

    Floats are quantised as diffusers' ``numpy_to_pil`` does, so every form of one image reads the same.
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        return np.rint(np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0)
    return array.astype(np.float64)


def _nearest(rgb: np.ndarray, names: Sequence[str]) -> str:
    table = np.asarray([COLOURS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((table - rgb) ** 2).sum(1)))]


@lru_cache(maxsize=16)
def _border(height: int, width: int) -> np.ndarray:
    """Bool ``(H, W)``: the ring of pixels objects never reach (half the renderer's margin)."""
    width_px = max(2, int(min(height, width) * MARGIN / 2))
    ring = np.ones((height, width), dtype=bool)
    ring[width_px:-width_px, width_px:-width_px] = False
    return ring


def _two_means(values: np.ndarray, iterations: int = 10) -> np.ndarray:
    """Bool split of 1-D ``values`` into a low and a high cluster (Lloyd's iterations from the 5/95 % points)."""
    low, high = np.percentile(values, [5, 95])
    upper = values > (low + high) / 2
    for _ in range(iterations):
        if upper.all() or not upper.any():
            break
        low, high = values[~upper].mean(), values[upper].mean()
        upper = values > (low + high) / 2
    return upper


def _read_tones(rgb: np.ndarray) -> _Background:
    """The background's tones from the border: one, or the light and dark ends of a texture's segment.

    A blurred texture mixes its tones at every stripe or square boundary, which pulls the two clusters'
    medians together; the segment's ends are therefore the 2 % / 98 % points along the clusters' axis.
    """
    pixels = rgb[_border(*rgb.shape[:2])]
    upper = _two_means(pixels.mean(1))
    if 0.03 <= upper.mean() <= 0.97:
        light, dark = np.median(pixels[upper], 0), np.median(pixels[~upper], 0)
        gap = float(np.linalg.norm(light - dark))
        if gap >= TWO_TONE_DISTANCE:
            axis = (light - dark) / gap
            low, high = np.percentile((pixels - dark) @ axis, [2, 98])
            name = _nearest(light, BACKGROUND_COLOURS)
            return _Background(dark + high * axis, dark + low * axis, name, textured=True)
    tone = np.median(pixels, 0)
    return _Background(tone, tone, _nearest(tone, BACKGROUND_COLOURS), textured=False)


def _segment_position(rgb: np.ndarray, bg: _Background) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: distance to the segment ``dark -> light`` and the position ``t`` along it (0 = dark)."""
    axis = bg.light - bg.dark
    offset = rgb - bg.dark
    length2 = float(axis @ axis)
    t = np.clip(offset @ axis / length2, 0.0, 1.0) if length2 > 0 else np.ones(rgb.shape[:2])
    return np.linalg.norm(offset - t[..., None] * axis, axis=-1), t


def _neighbour_count(mask: np.ndarray) -> np.ndarray:
    """How many of each pixel's 8 neighbours are in ``mask``."""
    padded = np.pad(mask, 1).astype(np.int8)
    h, w = mask.shape
    return sum(
        padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx
    )


def _object_mask(distance: np.ndarray) -> np.ndarray:
    """Bool ``(H, W)``: pixels further than half the object's distance from the background's tones."""
    core = distance > CORE_DISTANCE
    core &= _neighbour_count(core) > 0
    if core.sum() < 3:
        return np.zeros(distance.shape, dtype=bool)
    mask = distance > 0.5 * float(np.median(distance[core]))
    return mask & (_neighbour_count(mask) > 0)


def _two_colours(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The two colour clusters of ``pixels`` (``(N, 3)``) when they hold two distinct colours, else None."""
    centred = pixels - pixels.mean(0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    upper = _two_means(centred @ axis)
    if min(upper.mean(), 1 - upper.mean()) < 0.15:
        return None
    a, b = np.median(pixels[upper], 0), np.median(pixels[~upper], 0)
    return (a, b) if np.linalg.norm(a - b) > 2 * CORE_DISTANCE else None


def _read_colour(rgb: np.ndarray, mask: np.ndarray) -> tuple[str, np.ndarray, list[np.ndarray]]:
    """The colour's name, the median RGB of the mask's interior, and the object's colours (one or two)."""
    interior = mask & ~mask_edges(mask)
    pixels = rgb[interior] if interior.sum() >= 5 else rgb[mask]
    median = np.median(pixels, 0)
    clusters = _two_colours(pixels) if len(pixels) >= 10 else None
    if clusters is None:
        return _nearest(median, tuple(COLOURS)), median, [median]
    stripes = np.asarray(SUBJECT_STRIPES, dtype=np.float64)
    straight = max(np.linalg.norm(clusters[0] - stripes[0]), np.linalg.norm(clusters[1] - stripes[1]))
    swapped = max(np.linalg.norm(clusters[0] - stripes[1]), np.linalg.norm(clusters[1] - stripes[0]))
    name = SUBJECT_COLOUR if min(straight, swapped) < STRIPE_MATCH else _nearest(median, tuple(COLOURS))
    return name, median, list(clusters)


def _refine_outline(
    rgb: np.ndarray, mask: np.ndarray, bg: _Background, colours: list[np.ndarray]
) -> np.ndarray:
    """Decide the pixels along the mask's outline by coverage, the renderer's rule.

    Each is read as the mix ``p = a o + (1 - a) b`` of the object colour ``o`` and background tone ``b``
    that explain it best (least residual); it is object when ``a > 1/2``. The distance rule alone
    misses, e.g., black over a light tone, whose half mix looks like the dark tone.
    """
    band = _dilate(mask, 1) & ~(mask & ~mask_edges(mask))
    pixels = rgb[band]
    best_residual = np.full(len(pixels), np.inf)
    coverage = np.zeros(len(pixels))
    for o in colours:
        for b in (bg.light, bg.dark) if bg.textured else (bg.light,):
            axis = o - b
            a = np.clip((pixels - b) @ axis / max(float(axis @ axis), 1e-9), 0.0, 1.0)
            residual = np.linalg.norm(pixels - b - a[:, None] * axis, axis=1)
            better = residual < best_residual
            best_residual[better], coverage[better] = residual[better], a[better]
    refined = mask.copy()
    refined[band] = coverage > 0.5
    return refined & (_neighbour_count(refined) > 0)


def _fit_template(shape: str, box: tuple[int, int, int, int]) -> tuple[float, float, float]:
    """Centre and radius (pixels) that put ``shape``'s unit box onto the pixel box ``box``."""
    x0, y0, x1, y1 = box
    ux0, uy0, ux1, uy1 = shape_extent(shape)
    r = float(np.sqrt((x1 - x0) / (ux1 - ux0) * (y1 - y0) / (uy1 - uy0)))
    return (x0 + x1) / 2 - r * (ux0 + ux1) / 2, (y0 + y1) / 2 - r * (uy0 + uy1) / 2, r


def _read_shape(mask: np.ndarray, box: tuple[int, int, int, int]) -> tuple[str, float, float]:
    """Best shape by template IoU, that IoU, and the template's radius in pixels."""
    best = ("", -1.0, 0.0)
    for shape in SHAPES:
        cx, cy, r = _fit_template(shape, box)
        iou = mask_iou(shape_mask(shape, cx, cy, r, mask.shape), mask)
        if iou > best[1]:
            best = (shape, iou, r)
    return best


def _read_texture(tone_t: np.ndarray, background: np.ndarray) -> str:
    """``striped``, ``checkered`` or ``speckled``: the pattern of dark tones that best explains the background."""
    size = min(tone_t.shape)
    w = texture_period(size)
    ys, xs = np.nonzero(background)
    dark = tone_t[background] < 0.5
    phases = np.arange(2 * w)[:, None]
    stripes = ((xs + ys + phases) // w) % 2 == 1  # (2w, N)
    stripe_fit = (stripes == dark).mean(1).max()
    columns, rows = ((xs + phases) // w) % 2 == 1, ((ys + phases) // w) % 2 == 1  # (2w, N) each
    checker_fit = ((columns[:, None] ^ rows[None]) == dark).mean(-1).max()
    if max(stripe_fit, checker_fit) < PATTERN_AGREEMENT:
        return "speckled"
    return "striped" if stripe_fit >= checker_fit else "checkered"


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        mask = mask | (_neighbour_count(mask) > 0)
    return mask


def score_image(image: np.ndarray | Image.Image) -> Reading:
    """Read one image (PIL, uint8 ``(H, W, 3)`` or float ``(H, W, 3)`` in ``[0, 1]``) back into attributes."""
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    bg = _read_tones(rgb)
    distance, tone_t = _segment_position(rgb, bg)
    mask = _object_mask(distance)
    background = ~_dilate(mask, 2)
    texture = _read_texture(tone_t, background) if bg.textured and background.any() else "plain"
    if not mask.any():
        return Reading(None, None, None, bg.name, texture, mask, mask.copy(), None, None, None, 0.0)
    colour, median, colours = _read_colour(rgb, mask)
    mask = _refine_outline(rgb, mask, bg, colours)
    box = mask_box(mask)
    shape, iou, r = _read_shape(mask, box)
    small_max, large_min = SIZE_RADII["small"][1], SIZE_RADII["large"][0]
    size = "small" if r / min(height, width) < (small_max + large_min) / 2 else "large"
    centre = ((box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height)
    rgb_read = tuple(int(v) for v in np.rint(median))
    tones = tuple(tuple(int(v) for v in np.rint(c)) for c in colours)
    return Reading(
        colour, shape, size, bg.name, texture, mask, mask_edges(mask), box, centre, rgb_read, iou, tones
    )


def aligned_tones(colours: Sequence[Sequence[float]], to: Sequence[Sequence[float]]) -> np.ndarray:
    """``colours`` as two tones ``(2, 3)`` in the order that matches ``to``'s tones best.

    One or two colours on each side (as :attr:`Reading.colours`); a solid colour counts as two tones
    of one colour, and two tones are matched the cheaper way round (straight on a tie).
    """
    if not colours or not to:
        raise ValueError("give one or two colours on each side to compare")
    tones = np.resize(np.asarray(colours, dtype=np.float64), (2, 3))  # a single colour is repeated
    target = np.resize(np.asarray(to, dtype=np.float64), (2, 3))
    straight = np.linalg.norm(tones - target, axis=1).sum()
    swapped = np.linalg.norm(tones[::-1] - target, axis=1).sum()
    return tones if straight <= swapped else tones[::-1]


def colour_distance(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> float:
    """Mean RGB distance between two objects' colours (one or two each, as :attr:`Reading.colours`).

    A solid object counts as two tones of one colour; two-tone objects are matched tone to tone the
    cheaper way round (:func:`aligned_tones`). 0 for the same colours; a solid named colour is at
    least 146 from the subject's pink and teal, two named colours at least 114.
    """
    tones = aligned_tones(a, b)
    return float(np.linalg.norm(tones - np.resize(np.asarray(b, dtype=np.float64), (2, 3)), axis=1).mean())


def attribute_accuracy(readings: Sequence[Reading], scenes: Sequence[Scene]) -> dict[str, float]:
    """Fraction of readings that got each of ``ATTRIBUTES`` of their scene right."""
    if len(readings) != len(scenes):
        raise ValueError(f"{len(readings)} readings for {len(scenes)} scenes")
    if not scenes:
        raise ValueError("no scenes to compare")
    return {
        name: sum(getattr(r, name) == getattr(s, name) for r, s in zip(readings, scenes)) / len(scenes)
        for name in ATTRIBUTES
    }


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def edge_f1(predicted: np.ndarray, target: np.ndarray, tolerance: int = 1) -> float:
    """F1 of two bool edge maps, an edge pixel matching one within ``tolerance`` pixels (8-neighbourhood steps).

    precision = share of ``predicted`` near ``target``, recall = share of ``target`` near ``predicted``;
    1.0 when both are empty, 0.0 when only one is.
    """
    predicted, target = np.asarray(predicted, dtype=bool), np.asarray(target, dtype=bool)
    if not predicted.any() and not target.any():
        return 1.0
    if not predicted.any() or not target.any():
        return 0.0
    precision = (predicted & _dilate(target, tolerance)).sum() / predicted.sum()
    recall = (target & _dilate(predicted, tolerance)).sum() / target.sum()
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0
