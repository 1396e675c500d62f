"""Control fidelity (OFT / BOFT's Canny- and segmentation-to-image): held-out cases, detectors that read
the control signal back from samples, and the edge F1 / mask IoU of each case."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageFilter

from ..world import (
    caption_of,
    condition_image,
    edge_f1,
    mask_iou,
    render,
    sample_scenes,
    score_image,
)
from .dreambooth import Measurement, _mean
from .scorers import MetricsError

# --- control fidelity -------------------------------------------------------------------------------

CONTROL_MAPS: tuple[str, ...] = ("edges", "mask")
"""The maps a :class:`ControlCase` may hold and a :class:`ControlDetector` may read: bool ``(H, W)`` each."""
CONTROL_METRICS: dict[str, str] = {"edges": "control_edge_f1", "mask": "control_mask_iou"}
"""The metric :func:`measure_control` reports for each map."""
CONTROL_SEED = 1_000_000
"""Default seed of :func:`world_control_cases`: a stream of scenes no training draws from. Pretraining
(``scripts/pretrain_tiny.py`` at its default seed 0) draws its denoiser's scenes from seed 10_000 and its
VAE and decoder batches from seeds 0-999 and 3_000_009-3_000_808; positions and radii are continuous,
so no validation scene repeats a training scene."""
CONTROL_DETECTORS: tuple[str, ...] = ("world", "edges", "none")
"""The specs :func:`load_control_detector` accepts."""


def _control_map(value: Any, what: str) -> np.ndarray:
    """``value`` as a bool ``(H, W)`` array, or a :class:`MetricsError` naming ``what``."""
    array = np.asarray(value)
    if array.ndim != 2 or 0 in array.shape:
        raise MetricsError(f"{what} must be a 2-D (H, W) map, got shape {array.shape}")
    return array.astype(bool)


@dataclass(frozen=True, eq=False)
class ControlCase:
    """One validation example of controllable generation: a prompt, its conditioning image, and the
    ground-truth maps a :class:`ControlDetector`'s reading of a sample is scored against.

    ``target`` holds some of ``CONTROL_MAPS``, each bool ``(H, W)`` of the condition's size: both the
    renderer's ``edges`` and ``mask`` for the world (:func:`world_control_cases`), the binarised
    condition under its kind for a user's data (:func:`cases_from_conditions`). Cases compare by
    identity (their maps are arrays).
    """

    prompt: str
    """May be empty: a ControlNet can be asked to follow its condition alone."""
    condition: Image.Image
    target: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise MetricsError(f"a control case's prompt must be a string, got {type(self.prompt).__name__}")
        if not isinstance(self.condition, Image.Image):
            raise MetricsError(
                f"a control case's condition must be a PIL image, got {type(self.condition).__name__}"
            )
        if not isinstance(self.target, dict) or not self.target:
            raise MetricsError(f"a control case needs a target: a dict of some of {', '.join(CONTROL_MAPS)}")
        unknown = sorted(set(self.target) - set(CONTROL_MAPS))
        if unknown:
            raise MetricsError(
                f"unknown target map(s) {', '.join(map(repr, unknown))}; expected {CONTROL_MAPS}"
            )
        size = (self.condition.height, self.condition.width)
        target = {
            name: _control_map(self.target[name], f"target {name!r}")
            for name in CONTROL_MAPS
            if name in self.target
        }
        for name, array in target.items():
            if array.shape != size:
                raise MetricsError(
                    f"target {name!r} is {array.shape[0]}x{array.shape[1]} (HxW) but the condition is "
                    f"{size[0]}x{size[1]}: a target map must be the condition's own geometry"
                )
        object.__setattr__(self, "target", target)


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MetricsError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_kind(kind: Any) -> None:
    if kind not in CONTROL_MAPS:
        raise MetricsError(f"unknown condition kind {kind!r}; expected one of {', '.join(CONTROL_MAPS)}")


def world_control_cases(
    num_cases: int = 8, seed: int = CONTROL_SEED, kind: str = "edges", resolution: int = 64
) -> list[ControlCase]:
    """Held-out world scenes as control cases: ``sample_scenes(num_cases, seed)`` rendered at ``resolution``.

    prompt = ``caption_of(scene)``, condition = ``condition_image(maps, kind)`` (white on black RGB),
    target = the renderer's exact ``{"edges": maps.edges, "mask": maps.mask}`` whatever the kind: the
    object's geometry is what either condition encodes. ``seed`` defaults to ``CONTROL_SEED``, a
    stream no training draws from.
    """
    _positive_int("num_cases", num_cases)
    _positive_int("resolution", resolution, minimum=16)
    _check_kind(kind)
    cases = []
    for scene in sample_scenes(num_cases, seed):
        _, maps = render(scene, resolution)
        target = {"edges": maps.edges, "mask": maps.mask}
        cases.append(ControlCase(caption_of(scene), condition_image(maps, kind), target))
    return cases


def cases_from_conditions(
    prompts: Sequence[str], conditions: Sequence[Image.Image], kind: str = "edges", threshold: int = 128
) -> list[ControlCase]:
    """Control cases from a user's validation pairs: the target is the binarised condition.

    target = ``{kind: luminance(condition) >= threshold}``, luminance as PIL's ``"L"`` mode (ITU-R 601),
    so a white-on-black edge or mask image gives its white pixels.
    """
    if isinstance(prompts, str):
        raise MetricsError("prompts must be a sequence of prompts, not one string")
    if not prompts or not conditions:
        raise MetricsError("give at least one prompt and one condition image")
    if len(prompts) != len(conditions):
        raise MetricsError(
            f"{len(prompts)} prompts for {len(conditions)} condition images: give one prompt per condition"
        )
    _check_kind(kind)
    if not isinstance(threshold, int) or isinstance(threshold, bool) or not 1 <= threshold <= 255:
        raise MetricsError(f"threshold must be an integer luminance level in [1, 255], got {threshold!r}")
    cases = []
    for i, (prompt, condition) in enumerate(zip(prompts, conditions)):
        if not isinstance(condition, Image.Image):
            raise MetricsError(f"condition {i} must be a PIL image, got {type(condition).__name__}")
        target = np.asarray(condition.convert("L")) >= threshold
        cases.append(ControlCase(prompt, condition, {kind: target}))
    return cases


class ControlDetector(Protocol):
    """Reads the control signal back from a generated image (the papers' Canny, segmenter, ...)."""

    name: str
    maps: tuple[str, ...]
    """The maps of ``CONTROL_MAPS`` that :meth:`read` returns (checked before anything is sampled)."""

    def read(self, image: Image.Image) -> dict[str, np.ndarray]:
        """The maps detected on ``image``: ``{name: bool (H, W)}`` for each of :attr:`maps`."""
        ...


class WorldControlDetector:
    """The world scorer's reading of a sample: the object's ``mask`` and its ``edges`` (empty when it
    finds no object), exact on clean renders and robust to mild noise and blur."""

    name = "world"
    maps = ("edges", "mask")

    def read(self, image: Image.Image) -> dict[str, np.ndarray]:
        reading = score_image(image)
        if reading.box is None:
            empty = np.zeros((image.height, image.width), dtype=bool)
            return {"edges": empty, "mask": empty.copy()}
        return {"edges": reading.edges, "mask": reading.mask}


SOBEL_NORM = 4.0
"""Sobel's 1-2-1 kernels answer a step of ``h`` grey levels with ``4 h``; dividing by this gives ``h``."""
THIN_DIRECTIONS: tuple[tuple[int, int], ...] = ((0, 1), (1, 1), (1, 0), (1, -1))
"""(dy, dx) of the neighbours along the gradient for directions 0, 45, 90, 135 degrees."""


def _shifted(plane: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``plane`` moved so that pixel ``(i, j)`` holds ``plane[i + dy, j + dx]`` (zero off the image)."""
    h, w = plane.shape
    padded = np.pad(plane, 1)
    return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def _sobel(plane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel derivatives ``(gx, gy)`` of a float ``(H, W)`` plane, edges replicated, in grey levels per step."""
    p = np.pad(plane, 1, mode="edge")
    gx = p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:] - p[:-2, :-2] - 2 * p[1:-1, :-2] - p[2:, :-2]
    gy = p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:] - p[:-2, :-2] - 2 * p[:-2, 1:-1] - p[:-2, 2:]
    return gx / SOBEL_NORM, gy / SOBEL_NORM


def _colour_gradient(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel, the Sobel gradient of the channel where it is largest: ``(magnitude, gx, gy)``.

    As OpenCV's Canny does on a colour image; a grey image would lose edges between colours of equal
    luminance (the world's red and blue differ by 12 grey levels).
    """
    gx, gy = zip(*(_sobel(rgb[..., c]) for c in range(rgb.shape[-1])))
    gx, gy = np.stack(gx), np.stack(gy)  # (C, H, W)
    strongest = np.argmax(gx**2 + gy**2, axis=0)[None]
    gx, gy = np.take_along_axis(gx, strongest, 0)[0], np.take_along_axis(gy, strongest, 0)[0]
    return np.hypot(gx, gy), gx, gy


def _local_maxima(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression: pixels at least as strong as both neighbours along their gradient.

    The direction is rounded to 0, 45, 90 or 135 degrees. A tie across a step between two pixels
    keeps the pixel on the step's far side only (``>`` behind, ``>=`` ahead), so an edge is one pixel thick.
    """
    direction = np.rint(np.rad2deg(np.arctan2(gy, gx)) % 180 / 45).astype(int) % 4
    keep = np.zeros(magnitude.shape, dtype=bool)
    for k, (dy, dx) in enumerate(THIN_DIRECTIONS):
        ahead, behind = _shifted(magnitude, dy, dx), _shifted(magnitude, -dy, -dx)
        keep |= (direction == k) & (magnitude >= ahead) & (magnitude > behind)
    return keep


class EdgeDetector:
    """A deterministic Canny-like edge detector for real images, numpy and PIL only.

    1. light Gaussian blur of radius ``blur`` pixels (PIL ``ImageFilter.GaussianBlur``; 0: none);
    2. Sobel gradient per RGB channel, the strongest channel's per pixel (:func:`_colour_gradient`),
       its magnitude in grey levels (a sharp step of ``h`` levels reads ``h``);
    3. thinned to one pixel by non-maximum suppression along the gradient (:func:`_local_maxima`);
    4. kept where ``magnitude >= max(threshold * magnitude.max(), min_contrast)``: relative to the
       image's strongest edge, as Canny's thresholds are in practice, but never below ``min_contrast``
       grey levels, so a flat image has no edges.

    Unlike Canny there is no hysteresis (one threshold). On world renders with plain backgrounds it
    finds the renderer's edges with ``edge_f1`` near 1, also under noise of sigma 12 grey levels; a
    textured background's stripes and squares are edges too and are found as such.
    """

    name = "edges"
    maps = ("edges",)

    def __init__(self, blur: float = 1.0, threshold: float = 0.2, min_contrast: float = 8.0) -> None:
        for field, value in (("blur", blur), ("min_contrast", min_contrast)):
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise MetricsError(f"edge detector: {field} must be a finite number >= 0, got {value!r}")
        if not isinstance(threshold, int | float) or not 0 < threshold <= 1:
            raise MetricsError(
                f"edge detector: threshold is a fraction of the strongest edge, in (0, 1], got {threshold!r}"
            )
        self.blur, self.threshold, self.min_contrast = float(blur), float(threshold), float(min_contrast)

    def read(self, image: Image.Image) -> dict[str, np.ndarray]:
        image = image.convert("RGB")
        if self.blur > 0:
            image = image.filter(ImageFilter.GaussianBlur(self.blur))
        magnitude, gx, gy = _colour_gradient(np.asarray(image, dtype=np.float64))
        strong = magnitude >= max(self.threshold * float(magnitude.max()), self.min_contrast)
        return {"edges": strong & _local_maxima(magnitude, gx, gy)}


def load_control_detector(spec: str) -> ControlDetector | None:
    """A detector from its spec: ``"world"`` (:class:`WorldControlDetector`), ``"edges"``
    (:class:`EdgeDetector` with its defaults) or ``"none"`` (``None``: no control measurement)."""
    if spec == "world":
        return WorldControlDetector()
    if spec == "edges":
        return EdgeDetector()
    if spec == "none":
        return None
    raise MetricsError(
        f"unknown control detector {spec!r}; expected one of {', '.join(map(repr, CONTROL_DETECTORS))}"
    )


@dataclass(frozen=True)
class ControlProbe:
    """The cases and sampling settings of a control measurement (see :func:`measure_control`)."""

    cases: tuple[ControlCase, ...]
    num_images: int = 1
    """Images per case; image ``i`` is sampled with seed ``seed + i``."""
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.cases, ControlCase):
            raise MetricsError("cases must be a sequence of control cases, not one case")
        object.__setattr__(self, "cases", tuple(self.cases))
        if not self.cases:
            raise MetricsError(
                "a control probe needs at least one case (world_control_cases, cases_from_conditions)"
            )
        wrong = [i for i, case in enumerate(self.cases) if not isinstance(case, ControlCase)]
        if wrong:
            raise MetricsError(f"cases {wrong} are not ControlCase objects")
        _positive_int("num_images", self.num_images)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise MetricsError(f"seed must be an integer, got {self.seed!r}")


ControlSampler = Callable[[list[str], list[Image.Image], list[int]], list[Image.Image]]
"""``sample(prompts, conditions, seeds)``: one image per (prompt, condition, seed), in order."""


def _sample_cases(sample: ControlSampler, probe: ControlProbe, batch_size: int) -> list[list[Image.Image]]:
    """``probe.num_images`` samples per case, ``[per case [images]]``, from chunks of at most ``batch_size``."""
    jobs = [(case, probe.seed + i) for case in probe.cases for i in range(probe.num_images)]
    images: list[Image.Image] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        out = sample(
            [case.prompt for case, _ in chunk], [case.condition for case, _ in chunk], [s for _, s in chunk]
        )
        out = list(out) if isinstance(out, Sequence) else out
        if not isinstance(out, list) or len(out) != len(chunk):
            got = f"{len(out)} images" if isinstance(out, list) else f"a {type(out).__name__}"
            raise MetricsError(
                f"the sampler returned {got} for {len(chunk)} (prompt, condition, seed) triples"
            )
        wrong = [start + k for k, image in enumerate(out) if not isinstance(image, Image.Image)]
        if wrong:
            raise MetricsError(f"the sampler returned something other than a PIL image for jobs {wrong}")
        images += out
    n = probe.num_images
    return [images[k * n : (k + 1) * n] for k in range(len(probe.cases))]


def _at_size(name: str, detected: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A detected map resized to the target's ``(H, W)`` by area (PIL's box filter).

    An ``edges`` cell is an edge when any edge pixel falls in it (a max-pool: nearest-neighbour would
    drop most of a thin outline, 0.6 F1 for an exact outline read at 4x the size); a ``mask`` cell is
    in the mask when at least half of it is.
    """
    if detected.shape == shape:
        return detected
    plane = Image.fromarray(detected.astype(np.uint8) * 255).resize(
        (shape[1], shape[0]), Image.Resampling.BOX
    )
    return np.asarray(plane) > 0 if name == "edges" else np.asarray(plane) >= 128


def _control_scores(detected: dict[str, np.ndarray], case: ControlCase) -> dict[str, float]:
    """Per map both the case and the detection have: edge_f1 for ``edges``, mask_iou for ``mask``."""
    scores = {}
    for name in CONTROL_MAPS:
        if name in case.target and name in detected:
            target = case.target[name]
            found = _at_size(name, _control_map(detected[name], f"detected {name!r}"), target.shape)
            scores[name] = edge_f1(found, target) if name == "edges" else mask_iou(found, target)
    return scores


def measure_control(
    sample: ControlSampler, probe: ControlProbe, detector: ControlDetector, batch_size: int = 16
) -> Measurement:
    """Sample every case of the probe and score the detector's reading of each sample against its target:

    control_edge_f1  = mean edge_f1(detected edges, target edges)   (1 px tolerance; the papers' Canny F1)
    control_mask_iou = mean mask_iou(detected mask, target mask)    (the papers' segmentation IoU)

    Means run over every case and image whose target and detection both have the map; a metric that
    no case can score (the cases hold only masks, say) is ``None``, so before / after tables line up.
    Detected maps of another size are resized to the target's by area (``_at_size``). ``sample(prompts, conditions,
    seeds)`` is called with at most ``batch_size`` triples at a time; image ``i`` of a case has seed
    ``probe.seed + i``. ``samples``: per case ``f"{i}: {prompt}"`` -> ``[condition, *its samples]``,
    the condition resized to the samples' size for a :func:`grid`.
    """
    _positive_int("batch_size", batch_size)
    targets = {name for case in probe.cases for name in case.target}
    if not targets & set(detector.maps):
        raise MetricsError(
            f"the {detector.name!r} detector reads {', '.join(detector.maps)} but the cases' targets are "
            f"{', '.join(sorted(targets))}: nothing to score (try the detector that reads {', '.join(sorted(targets))})"
        )
    scores: dict[str, list[float]] = {name: [] for name in CONTROL_MAPS}
    samples: dict[str, list[Image.Image]] = {}
    for i, (case, images) in enumerate(zip(probe.cases, _sample_cases(sample, probe, batch_size))):
        for image in images:
            for name, value in _control_scores(detector.read(image), case).items():
                scores[name].append(value)
        condition = case.condition.convert("RGB")
        if condition.size != images[0].size:
            condition = condition.resize(images[0].size, Image.Resampling.NEAREST)
        samples[f"{i}: {case.prompt}"] = [condition, *images]
    metrics = {CONTROL_METRICS[name]: _mean(values) if values else None for name, values in scores.items()}
    return Measurement(metrics=metrics, samples=samples)
