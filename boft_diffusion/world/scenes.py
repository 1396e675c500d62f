"""Procedural scenes: one simple object on a background, its caption and its exact condition maps.

Geometry. Every shape is a signed distance function (SDF) in a unit frame (radius 1, ``y`` pointing
down, the shape inside ``[-1, 1]^2``). A scene places it at centre ``(x, y)`` with radius ``r``, all
fractions of the image side ``S``. A pixel ``(i, j)`` is sampled at its centre ``(j + 0.5, i + 0.5)``:

    sdf_px(i, j) = r S · sdf_unit(((j + 0.5) / S - x) / r, ((i + 0.5) / S - y) / r)
    coverage     = clip(0.5 - sdf_px, 0, 1)                 (anti-aliased outline)
    image        = background · (1 - coverage) + object · coverage
    mask         = sdf_px < 0   ( = coverage > 0.5, exactly the object pixels)

so the condition maps (mask, its boundary, its box) come from the renderer's own geometry, not from
reading the image back. Only the pixels of the object's box are evaluated, which keeps a 64 × 64
scene at a fraction of a millisecond.

Backgrounds are a named colour, plain or textured. A texture alternates the colour with its darker
shade ``TEXTURE_SHADE · rgb``: diagonal stripes, a checkerboard (both of period ``2 · S // 16``
pixels, phase from the scene's seed) or speckles (random ``S // 32`` cells, from the seed).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
from PIL import Image

__all__ = [
    "ALL_PAIRS",
    "CAPTION_DROP",
    "BACKGROUND_COLOURS",
    "COLOURS",
    "HELD_OUT_PAIRS",
    "MARGIN",
    "SHAPES",
    "SIZES",
    "SIZE_RADII",
    "SUBJECT_BACKGROUNDS",
    "SUBJECT_COLOUR",
    "SUBJECT_SHAPE",
    "SUBJECT_STRIPES",
    "SUBJECT_TOKEN",
    "TEXTURES",
    "TEXTURE_SHADE",
    "Maps",
    "Scene",
    "caption_of",
    "caption_variant",
    "condition_image",
    "held_out_scenes",
    "mask_box",
    "mask_edges",
    "parse_caption",
    "partial_caption",
    "render",
    "render_subject",
    "sample_scenes",
    "scene_to_pil",
    "shape_extent",
    "shape_mask",
    "subject_scene",
    "subject_scenes",
    "texture_period",
]

RGB = tuple[int, int, int]
Pair = tuple[str, str]

COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
"""Object colours by name, fixed RGB; the scorer reads the nearest one."""
BACKGROUND_COLOURS: tuple[str, ...] = tuple(c for c in COLOURS if c != "black")
"""Background colours (black has no darker shade for a texture). A background never equals the object's colour."""
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross", "heart")
SIZES: tuple[str, ...] = ("small", "large")
SIZE_RADII: dict[str, tuple[float, float]] = {"small": (0.13, 0.19), "large": (0.27, 0.35)}
"""Radius range of each size class, as a fraction of the image side (the shape spans ``2 r``)."""
TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "speckled")
"""Background textures; each but ``plain`` is the word the caption puts before the colour."""
TEXTURE_SHADE = 0.6
"""A texture's second tone is the background colour times this."""
SPECKLE_DENSITY = 0.3
MARGIN = 0.1
"""The object stays this far (fraction of the side) from the image border: the border is background."""

ALL_PAIRS: tuple[Pair, ...] = tuple(itertools.product(COLOURS, SHAPES))
"""Every (colour, shape) pair of the world."""
HELD_OUT_PAIRS: tuple[Pair, ...] = (
    ("red", "square"),
    ("blue", "circle"),
    ("yellow", "star"),
    ("green", "triangle"),
    ("purple", "heart"),
)
"""Pairs the default sampler never draws (pretraining leaves them out; compositional tests use them)."""

SUBJECT_TOKEN = "sks toy"
"""The DreamBooth identifier of the one object the world never contains otherwise."""
SUBJECT_SHAPE = "star"
SUBJECT_COLOUR = "striped"
"""A subject scene's ``colour``: the star is striped in ``SUBJECT_STRIPES``, never a solid named colour."""
SUBJECT_STRIPES: tuple[RGB, RGB] = ((236, 72, 180), (32, 196, 204))
"""Pink and teal horizontal bands, ``SUBJECT_BANDS`` of them across the star's height."""
SUBJECT_BANDS = 5
SUBJECT_BACKGROUNDS: tuple[str, ...] = ("yellow", "white", "blue", "green")
"""Plain backgrounds of the subject's views (:func:`subject_scenes`): colours the tiny VAE keeps apart
from the pink and teal (its reconstructions score 0.73-0.79 on them). Not purple (beside the pink, the
VAE blends the two: 0.1-0.7), not red (0.71, at the edge), and not orange, the default probe's plain
context: a context the instance images show would not test the subject in a new one."""


@dataclass(frozen=True)
class Scene:
    """One object on one background.

    ``x``, ``y``: the object's centre and ``radius`` its size, as fractions of the image side
    (``radius=None`` is the middle of the size class's range). ``seed`` fixes the texture's phase or
    speckles. ``colour == SUBJECT_COLOUR`` makes the scene show the DreamBooth subject.
    """

    shape: str
    colour: str
    size: str
    background: str
    texture: str = "plain"
    x: float = 0.5
    y: float = 0.5
    radius: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.shape, SHAPES, "shape")
        _check(self.size, SIZES, "size")
        _check(self.background, BACKGROUND_COLOURS, "background")
        _check(self.texture, TEXTURES, "texture")
        if self.colour == SUBJECT_COLOUR:
            if self.shape != SUBJECT_SHAPE:
                raise ValueError(f"the subject is a {SUBJECT_SHAPE}, not a {self.shape}")
        else:
            _check(self.colour, COLOURS, "colour")
        if self.colour == self.background:
            raise ValueError(f"object and background are both {self.colour}: the object would vanish")
        low, high = SIZE_RADII[self.size]
        if not low <= self.r <= high:
            raise ValueError(f"radius {self.r} is outside the {self.size} range [{low}, {high}]")

    @property
    def r(self) -> float:
        """The radius actually used (``radius`` or the middle of the size class)."""
        return self.radius if self.radius is not None else sum(SIZE_RADII[self.size]) / 2

    @property
    def is_subject(self) -> bool:
        return self.colour == SUBJECT_COLOUR

    @property
    def pair(self) -> Pair:
        return (self.colour, self.shape)

    @property
    def caption(self) -> str:
        return caption_of(self)


@dataclass(frozen=True)
class Maps:
    """Exact condition maps of a rendered scene: ``mask`` and ``edges`` are bool ``(H, W)``;
    ``box`` is ``(x0, y0, x1, y1)`` with exclusive ends, so ``mask[y0:y1, x0:x1]`` holds every object pixel."""

    mask: np.ndarray
    edges: np.ndarray
    box: tuple[int, int, int, int]


def _check(value: str, allowed: Iterable[str], what: str) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_of(scene: Scene) -> str:
    """``"a photo of a small red circle on a blue background"``, ``"... on a striped green background"``;
    a subject scene is ``"a photo of sks toy on ..."``."""
    words = scene.background if scene.texture == "plain" else f"{scene.texture} {scene.background}"
    where = f"on {_article(words)} {words} background"
    if scene.is_subject:
        return f"a photo of {SUBJECT_TOKEN} {where}"
    return f"a photo of a {scene.size} {scene.colour} {scene.shape} {where}"


CAPTION_DROP = {"size": 0.2, "colour": 0.2, "background": 0.25, "shape": 0.15, "all": 0.1}
"""Pretraining's caption dropout: each attribute's chance to be left out (``shape``: said as "toy";
``all``: the empty prompt, for classifier-free guidance)."""


def partial_caption(
    scene: Scene, *, size: bool = True, colour: bool = True, shape: bool = True, background: bool = True
) -> str:
    """The scene's caption saying only some attributes: ``"a photo of a red toy"`` (shape off),
    ``"a photo of a large star on a striped blue background"`` (colour off). All on is :func:`caption_of`."""
    if scene.is_subject:
        raise ValueError("the subject's caption is caption_of(scene); it has no attributes to drop")
    words = [w for w, keep in ((scene.size, size), (scene.colour, colour)) if keep]
    words.append(scene.shape if shape else "toy")
    caption = f"a photo of {_article(words[0])} {' '.join(words)}"
    if background:
        bg = scene.background if scene.texture == "plain" else f"{scene.texture} {scene.background}"
        caption += f" on {_article(bg)} {bg} background"
    return caption


def caption_variant(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of ``scene`` with attributes dropped at the rates of ``CAPTION_DROP`` (pretraining's captions)."""
    if rng.random() < CAPTION_DROP["all"]:
        return ""
    keep = {
        name: bool(rng.random() >= CAPTION_DROP[name]) for name in ("size", "colour", "shape", "background")
    }
    return partial_caption(scene, **keep)


_BACKGROUND_CLAUSE = frozenset((*BACKGROUND_COLOURS, *TEXTURES, "a", "an"))


def parse_caption(prompt: str) -> dict[str, str]:
    """The world attributes ``prompt`` states: the inverse of :func:`caption_of` and :func:`partial_caption`.

    Keys among ``size``, ``colour``, ``shape``, ``background``, ``texture`` (``plain`` when a background
    colour comes without a texture word), and ``subject: "yes"`` when the prompt names ``SUBJECT_TOKEN``::

        "a photo of a red toy"                         -> {"colour": "red"}
        "a photo of sks toy on a striped green background"
            -> {"subject": "yes", "background": "green", "texture": "striped"}

    The background clause is the run of colour / texture / article words just before ``background``;
    the object's words come before the first ``on``. Words not of the world are ignored, so a prompt
    from outside the world gives ``{}``.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    stated: dict[str, str] = {}
    token = SUBJECT_TOKEN.split()
    if any(words[i : i + len(token)] == token for i in range(len(words))):
        stated["subject"] = "yes"
    object_words = words
    if "background" in words:
        end = len(words) - 1 - words[::-1].index("background")
        start = end
        while start > 0 and words[start - 1] in _BACKGROUND_CLAUSE:
            start -= 1
        object_words = words[:start]
        for word in words[start:end]:
            if word in BACKGROUND_COLOURS:
                stated["background"] = word
                stated.setdefault("texture", "plain")
            elif word in TEXTURES:
                stated["texture"] = word
    if "on" in object_words:
        object_words = object_words[: object_words.index("on")]
    for word in object_words:
        if word in SIZES:
            stated["size"] = word
        elif word in COLOURS or word == SUBJECT_COLOUR:
            stated["colour"] = word
        elif word in SHAPES:
            stated["shape"] = word
    return stated


# --- shapes: signed distances in the unit frame --------------------------------------------------


def _sdf_circle(x: np.ndarray, y: np.ndarray, cx: float = 0.0, cy: float = 0.0, r: float = 1.0) -> np.ndarray:
    return np.hypot(x - cx, y - cy) - r


def _sdf_box(x: np.ndarray, y: np.ndarray, hx: float, hy: float) -> np.ndarray:
    qx, qy = np.abs(x) - hx, np.abs(y) - hy
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


class _Polygon:
    """Exact SDF of a simple polygon: distance to the nearest edge, negative inside (even-odd crossings)."""

    def __init__(self, vertices: list[tuple[float, float]]) -> None:
        a = np.asarray(vertices, dtype=np.float32)
        b = np.roll(a, -1, axis=0)
        e = b - a
        shape = (-1, 1, 1)
        self.ax, self.ay, self.by = a[:, 0].reshape(shape), a[:, 1].reshape(shape), b[:, 1].reshape(shape)
        self.ex, self.ey = e[:, 0].reshape(shape), e[:, 1].reshape(shape)
        self.inv_len2 = (1 / (e**2).sum(1)).reshape(shape)
        flat = np.where(e[:, 1] == 0, np.float32(1), e[:, 1])
        self.slope = (e[:, 0] / flat).reshape(shape)  # dx/dy of each edge (unused where the edge is flat)

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        wx, wy = x[None] - self.ax, y[None] - self.ay
        t = np.clip((wx * self.ex + wy * self.ey) * self.inv_len2, 0.0, 1.0)
        d2 = ((wx - self.ex * t) ** 2 + (wy - self.ey * t) ** 2).min(0)
        spans = (y[None] >= self.ay) != (y[None] >= self.by)  # on the vertices' own values: no rounding
        crossings = (spans & (wx < wy * self.slope)).sum(0)
        return np.where(crossings % 2 == 1, -np.sqrt(d2), np.sqrt(d2))


def _star_vertices(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return list(zip(radii * np.cos(angles), radii * np.sin(angles)))


_TRIANGLE = _Polygon([(0.0, -0.866), (1.0, 0.866), (-1.0, 0.866)])
_DIAMOND = _Polygon([(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)])
_STAR = _Polygon(_star_vertices())
_HEART_TIP = _Polygon([(-0.95, -0.2), (0.0, -0.45), (0.95, -0.2), (0.0, 0.95)])

_SDF: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _sdf_circle,
    "square": lambda x, y: _sdf_box(x, y, 0.88, 0.88),
    "triangle": _TRIANGLE,
    "star": _STAR,
    "diamond": _DIAMOND,
    "cross": lambda x, y: np.minimum(_sdf_box(x, y, 1.0, 0.32), _sdf_box(x, y, 0.32, 1.0)),
    "heart": lambda x, y: np.minimum(
        np.minimum(_sdf_circle(x, y, -0.48, -0.42, 0.5), _sdf_circle(x, y, 0.48, -0.42, 0.5)),
        _HEART_TIP(x, y),
    ),
}


@cache
def shape_extent(shape: str) -> tuple[float, float, float, float]:
    """The shape's box in the unit frame, ``(x0, y0, x1, y1)`` (measured on a fine grid)."""
    _check(shape, SHAPES, "shape")
    t = np.linspace(-1.1, 1.1, 441)
    inside = _SDF[shape](t[None, :], t[:, None]) < 0
    cols, rows = np.flatnonzero(inside.any(0)), np.flatnonzero(inside.any(1))
    half = (t[1] - t[0]) / 2  # the outline lies between the last outside and the first inside sample
    x0, y0, x1, y1 = t[cols[0]] - half, t[rows[0]] - half, t[cols[-1]] + half, t[rows[-1]] + half
    return (float(x0), float(y0), float(x1), float(y1))


def _shape_sdf_px(
    shape: str, cx: float, cy: float, r: float, height: int, width: int
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """SDF in pixels over the object's box (centre, radius in pixels), and that box as array slices."""
    x0, x1 = max(0, int(np.floor(cx - r - 1))), min(width, int(np.ceil(cx + r + 1)))
    y0, y1 = max(0, int(np.floor(cy - r - 1))), min(height, int(np.ceil(cy + r + 1)))
    x = ((np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / r)[None, :]
    y = ((np.arange(y0, y1, dtype=np.float32) + 0.5 - cy) / r)[:, None]
    return r * _SDF[shape](x, y), (slice(y0, y1), slice(x0, x1))


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int | tuple[int, int]) -> np.ndarray:
    """Bool ``(H, W)`` mask of ``shape`` centred at pixel coordinates ``(cx, cy)`` with radius ``r`` pixels."""
    height, width = (size, size) if isinstance(size, int) else size
    sdf, box = _shape_sdf_px(shape, cx, cy, r, height, width)
    mask = np.zeros((height, width), dtype=bool)
    mask[box] = sdf < 0
    return mask


# --- backgrounds ---------------------------------------------------------------------------------


def texture_period(size: int) -> int:
    """Width in pixels of one stripe or checker square (half the pattern's period)."""
    return max(1, size // 16)


@lru_cache(maxsize=256)
def _periodic_dark_map(texture: str, phase_x: int, phase_y: int, size: int) -> np.ndarray:
    """Bool ``(S, S)`` dark-tone map of stripes or a checkerboard (cached: few phases exist per size)."""
    w = texture_period(size)
    xs, ys = np.arange(size)[None, :], np.arange(size)[:, None]
    if texture == "striped":
        dark = ((xs + ys + phase_x) // w) % 2 == 1
    else:
        dark = ((xs + phase_x) // w + (ys + phase_y) // w) % 2 == 1
    dark.flags.writeable = False
    return dark


def _dark_tone_map(texture: str, seed: int, size: int) -> np.ndarray | None:
    """Bool ``(S, S)``: where a textured background shows its darker tone (``None`` for plain)."""
    period = 2 * texture_period(size)
    if texture in ("striped", "checkered"):
        return _periodic_dark_map(texture, seed % period, (seed // period) % period, size)
    if texture == "speckled":
        cell = max(1, size // 32)
        n = -(-size // cell)
        cells = np.random.default_rng(seed).random((n, n), dtype=np.float32) < SPECKLE_DENSITY
        blocks = np.broadcast_to(cells[:, None, :, None], (n, cell, n, cell))
        return blocks.reshape(n * cell, n * cell)[:size, :size]
    return None


@cache
def _tones(background: str) -> np.ndarray:
    """uint8 ``(2, 3)``: a background's colour and its darker shade."""
    light = np.asarray(COLOURS[background], dtype=np.float64)
    return np.rint(np.stack([light, light * TEXTURE_SHADE])).astype(np.uint8)


def _background(scene: Scene, size: int) -> np.ndarray:
    """uint8 ``(S, S, 3)``: the background colour, alternating with its darker shade where textured."""
    tones = _tones(scene.background)
    dark_map = _dark_tone_map(scene.texture, scene.seed, size)
    if dark_map is None:
        return np.broadcast_to(tones[0], (size, size, 3)).copy()
    return tones.take(dark_map.view(np.uint8), axis=0)


# --- rendering -----------------------------------------------------------------------------------


def mask_edges(mask: np.ndarray) -> np.ndarray:
    """The mask's inner boundary: mask pixels with a 4-neighbour outside the mask (or off the image)."""
    interior = mask.copy()
    interior[1:] &= mask[:-1]
    interior[:-1] &= mask[1:]
    interior[:, 1:] &= mask[:, :-1]
    interior[:, :-1] &= mask[:, 1:]
    interior[0] = interior[-1] = False
    interior[:, 0] = interior[:, -1] = False
    return mask & ~interior


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)``, exclusive ends, the tightest box around the mask; ``None`` when it is empty."""
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    if cols.size == 0:
        return None
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def _object_colour(
    scene: Scene, rows: np.ndarray, cy: float, r: float, paint: Sequence[RGB] | None = None
) -> np.ndarray:
    """RGB of the object: ``(3,)`` for a solid colour, ``(h, 1, 3)`` per row for horizontal bands
    (the striped subject's ``SUBJECT_STRIPES``, or the two colours of ``paint``)."""
    if paint is None:
        if not scene.is_subject:
            return np.asarray(COLOURS[scene.colour], dtype=np.float32)
        paint = SUBJECT_STRIPES
    if len(paint) == 1:
        return np.asarray(paint[0], dtype=np.float32)
    band = np.floor((rows + 0.5 - cy) * SUBJECT_BANDS / (2 * r) + SUBJECT_BANDS / 2) % 2 == 1
    return np.where(band[:, None, None], paint[1], paint[0]).astype(np.float32)


def render(scene: Scene, size: int = 64, *, paint: Sequence[RGB] | None = None) -> tuple[np.ndarray, Maps]:
    """The scene as a uint8 ``(size, size, 3)`` image and its exact :class:`Maps`.

    ``paint`` overrides the object's colours with unnamed ones (the scene's caption no longer
    describes them): one RGB for a solid object, two for horizontal bands like the subject's.
    Pretraining uses it so that the VAE and the denoiser know colours beyond the named eight.
    """
    if paint is not None and len(paint) not in (1, 2):
        raise ValueError(f"paint takes one or two RGB colours, got {len(paint)}")
    image = _background(scene, size)
    cx, cy, r = scene.x * size, scene.y * size, scene.r * size
    sdf, box = _shape_sdf_px(scene.shape, cx, cy, r, size, size)
    coverage = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]
    colour = _object_colour(scene, np.arange(box[0].start, box[0].stop), cy, r, paint)
    patch = image[box].astype(np.float32)
    image[box] = np.rint(patch + (colour - patch) * coverage)
    # The box keeps >= 1 px of background around the shape, so the crop's maps are the image's.
    mask = np.zeros((size, size), dtype=bool)
    edges = np.zeros((size, size), dtype=bool)
    inside = sdf < 0
    mask[box] = inside
    edges[box] = mask_edges(inside)
    x0, y0 = box[1].start, box[0].start
    bx0, by0, bx1, by1 = mask_box(inside)
    return image, Maps(mask=mask, edges=edges, box=(bx0 + x0, by0 + y0, bx1 + x0, by1 + y0))


def scene_to_pil(scene: Scene, size: int = 64) -> Image.Image:
    """The rendered scene as an RGB PIL image."""
    return Image.fromarray(render(scene, size)[0], mode="RGB")


def condition_image(maps: Maps, kind: str = "edges") -> Image.Image:
    """A ControlNet-style conditioning image: the ``mask`` or ``edges`` map white on black, RGB."""
    _check(kind, ("mask", "edges"), "condition kind")
    plane = getattr(maps, kind).astype(np.uint8) * 255
    return Image.fromarray(np.repeat(plane[..., None], 3, axis=2), mode="RGB")


# --- sampling ------------------------------------------------------------------------------------


def _draw(rng: np.random.Generator, shape: str, colour: str) -> Scene:
    """One scene of the given pair with every other attribute drawn from ``rng``."""
    size = SIZES[rng.integers(len(SIZES))]
    backgrounds = [c for c in BACKGROUND_COLOURS if c != colour]
    background = backgrounds[rng.integers(len(backgrounds))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    radius = float(rng.uniform(*SIZE_RADII[size]))
    x, y = _position(rng, shape, radius)
    seed = int(rng.integers(2**31))
    return Scene(shape, colour, size, background, texture, x=x, y=y, radius=radius, seed=seed)


def _position(rng: np.random.Generator, shape: str, radius: float) -> tuple[float, float]:
    """A centre ``(x, y)`` drawn uniformly where the shape keeps ``MARGIN`` off every border."""
    ux0, uy0, ux1, uy1 = shape_extent(shape)
    x = float(rng.uniform(MARGIN - ux0 * radius, 1 - MARGIN - ux1 * radius))
    y = float(rng.uniform(MARGIN - uy0 * radius, 1 - MARGIN - uy1 * radius))
    return x, y


def _pairs(include: Iterable[Pair] | None, exclude: Iterable[Pair] | None) -> list[Pair]:
    if include is None:
        pairs = list(ALL_PAIRS)
        exclude = HELD_OUT_PAIRS if exclude is None else exclude
    else:
        pairs = [tuple(p) for p in include]
    for pair in [*pairs, *(exclude or ())]:
        if tuple(pair) not in ALL_PAIRS:
            raise ValueError(f"unknown (colour, shape) pair {tuple(pair)!r}")
    dropped = {tuple(p) for p in exclude or ()}
    pairs = [p for p in pairs if p not in dropped]
    if not pairs:
        raise ValueError("no (colour, shape) pair left to sample")
    return pairs


def sample_scenes(
    n: int, seed: int, *, include: Iterable[Pair] | None = None, exclude: Iterable[Pair] | None = None
) -> list[Scene]:
    """``n`` scenes drawn deterministically from ``seed``, the (colour, shape) pair uniform over a set.

    By default the set is every pair but ``HELD_OUT_PAIRS`` (the pretraining world). ``include``
    replaces the set (``include=HELD_OUT_PAIRS`` draws only the held-out pairs); ``exclude`` removes
    pairs from it (``exclude=()`` draws every pair).
    """
    pairs = _pairs(include, exclude)
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        colour, shape = pairs[rng.integers(len(pairs))]
        scenes.append(_draw(rng, shape, colour))
    return scenes


def held_out_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes of the held-out pairs only (the default sampler never draws these)."""
    return sample_scenes(n, seed, include=HELD_OUT_PAIRS)


def subject_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` views of the DreamBooth subject, deterministic from ``seed``: the default instance images.

    Every view is large, on a plain background of ``SUBJECT_BACKGROUNDS`` (each used in turn, in an
    order drawn from ``seed``), at a drawn radius and place. The views are what a model can show: the
    tiny VAE reconstructs each at a world-scorer subject likeness of 0.7 or more (a test checks the
    defaults against the shipped VAE), where a small star (its points blur into a circle at the 4x
    downsampling), a striped or checkered background (turned into diagonal stripes) or a purple one
    (blended with the pink) cap it near 0.1-0.26.
    """
    rng = np.random.default_rng(seed)
    backgrounds = [SUBJECT_BACKGROUNDS[i] for i in rng.permutation(len(SUBJECT_BACKGROUNDS))]
    scenes = []
    for i in range(n):
        radius = float(rng.uniform(*SIZE_RADII["large"]))
        x, y = _position(rng, SUBJECT_SHAPE, radius)
        background = backgrounds[i % len(backgrounds)]
        scenes.append(Scene(SUBJECT_SHAPE, SUBJECT_COLOUR, "large", background, x=x, y=y, radius=radius))
    return scenes


def subject_scene(seed: int) -> Scene:
    """One view of the subject, deterministic from ``seed``."""
    return subject_scenes(1, seed)[0]


def render_subject(seed: int = 0, size: int = 64) -> tuple[np.ndarray, Maps]:
    """``render(subject_scene(seed), size)``: the subject (a pink-and-teal striped star) in one view."""
    return render(subject_scene(seed), size)
