"""Tests for the procedural world: seeded scenes, captions, exact condition maps, the scorer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from boft_diffusion import world
from boft_diffusion.world import (
    ATTRIBUTES,
    HELD_OUT_PAIRS,
    MARGIN,
    SUBJECT_TOKEN,
    Scene,
    attribute_accuracy,
    edge_f1,
    mask_iou,
    render,
    sample_scenes,
    score_image,
)


def degrade(image: np.ndarray, seed: int, noise: float = 8.0, blur: float = 0.6) -> np.ndarray:
    """A Gaussian blur of ``blur`` pixels, then Gaussian noise of ``noise`` / 255 per channel."""
    taps = np.arange(-2, 3)
    kernel = np.exp(-(taps**2) / (2 * blur**2))
    kernel /= kernel.sum()
    out = image.astype(np.float64)
    for axis in (0, 1):
        padded = np.pad(out, [(2, 2) if a == axis else (0, 0) for a in range(3)], mode="edge")
        out = sum(k * np.take(padded, range(i, i + out.shape[axis]), axis=axis) for i, k in enumerate(kernel))
    out += np.random.default_rng(seed).normal(0.0, noise, out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return sample_scenes(300, seed=7, exclude=())


@pytest.fixture(scope="module")
def renders(scenes) -> list[tuple[np.ndarray, world.Maps]]:
    return [render(scene) for scene in scenes]


# --- scenes ---------------------------------------------------------------------------------------


def test_the_world_has_the_attributes_it_promises():
    assert len(world.SHAPES) >= 5 and len(world.COLOURS) >= 6 and world.SIZES == ("small", "large")
    assert {"plain", "striped", "checkered", "speckled"} <= set(world.TEXTURES)
    assert all(len(rgb) == 3 and all(0 <= v <= 255 for v in rgb) for rgb in world.COLOURS.values())


def test_sampling_and_rendering_are_deterministic_from_the_seed():
    first, again, other = sample_scenes(40, 3), sample_scenes(40, 3), sample_scenes(40, 4)
    assert first == again and first != other
    for a, b in zip(first, again):
        (image_a, maps_a), (image_b, maps_b) = render(a), render(b)
        assert np.array_equal(image_a, image_b) and np.array_equal(maps_a.mask, maps_b.mask)
    assert world.subject_scenes(5, 1) == world.subject_scenes(5, 1) != world.subject_scenes(5, 2)


def test_sampling_leaves_the_global_rng_alone():
    np.random.seed(0)
    expected = np.random.random(3)
    np.random.seed(0)
    render(sample_scenes(5, 1)[0])
    assert np.array_equal(np.random.random(3), expected)


def test_renders_are_uint8_images_of_the_requested_size(scenes):
    for size in (32, 64, 128):
        image, maps = render(scenes[0], size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert maps.mask.shape == maps.edges.shape == (size, size) and maps.mask.dtype == bool
        assert world.scene_to_pil(scenes[0], size).size == (size, size)


def test_captions_name_the_attributes(scenes):
    assert (
        Scene("circle", "red", "small", "blue").caption
        == "a photo of a small red circle on a blue background"
    )
    striped = Scene("star", "white", "large", "green", "striped")
    assert world.caption_of(striped) == "a photo of a large white star on a striped green background"
    assert Scene("heart", "blue", "small", "orange").caption.endswith("on an orange background")
    for scene in scenes:
        words = scene.caption.split()
        assert {scene.size, scene.colour, scene.shape, scene.background} <= set(words)
        assert (scene.texture in words) == (scene.texture != "plain")


def test_scenes_refuse_what_the_world_cannot_show():
    with pytest.raises(ValueError, match="both red"):
        Scene("circle", "red", "small", "red")
    with pytest.raises(ValueError, match="unknown shape"):
        Scene("hexagon", "red", "small", "blue")
    with pytest.raises(ValueError, match="outside the small range"):
        Scene("circle", "red", "small", "blue", radius=0.3)
    with pytest.raises(ValueError, match="subject is a star"):
        Scene("circle", world.SUBJECT_COLOUR, "small", "blue")


# --- condition maps -------------------------------------------------------------------------------


def _coverage(scene: Scene) -> np.ndarray:
    """Object coverage per pixel, measured from pixels alone: the same scene with a white and a black
    object differs by ``coverage * (white - black)`` (up to rounding)."""
    background = scene.background if scene.background != "white" else "blue"
    white = render(dataclasses.replace(scene, colour="white", background=background))[0].astype(float)
    black = render(dataclasses.replace(scene, colour="black", background=background))[0].astype(float)
    delta = np.subtract(world.COLOURS["white"], world.COLOURS["black"], dtype=float)
    return (white - black) @ delta / (delta @ delta)


def test_mask_is_exactly_the_pixels_the_object_covers_more_than_half(scenes):
    for scene in scenes[:80]:
        coverage, mask = _coverage(scene), render(scene)[1].mask
        decided = np.abs(coverage - 0.5) > 0.02  # rounding to uint8 blurs coverage by < 0.01
        assert np.array_equal(mask[decided], coverage[decided] > 0.5), scene
        assert mask.sum() > 0


def test_fully_covered_pixels_show_the_object_colour(scenes, renders):
    for scene, (image, maps) in zip(scenes[:80], renders):
        interior = maps.mask & ~maps.edges
        assert (image[interior] == world.COLOURS[scene.colour]).all(axis=1).mean() > 0.9


def test_edges_are_the_mask_boundary_and_the_box_bounds_it(renders):
    for _, maps in renders:
        mask = maps.mask
        all_neighbours_in = np.ones_like(mask)
        for shift, axis in ((1, 0), (-1, 0), (1, 1), (-1, 1)):
            all_neighbours_in &= np.roll(mask, shift, axis=axis)  # the border is background: no wrap-around
        assert np.array_equal(maps.edges, mask & ~all_neighbours_in)
        x0, y0, x1, y1 = maps.box
        assert mask[y0:y1, x0:x1].sum() == mask.sum()
        assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()
        inset = int(MARGIN * mask.shape[0]) - 1
        assert not mask[:inset].any() and not mask[-inset:].any()
        assert not mask[:, :inset].any() and not mask[:, -inset:].any()


def test_condition_images_show_the_maps(renders):
    maps = renders[0][1]
    for kind in ("mask", "edges"):
        image = np.asarray(world.condition_image(maps, kind))
        assert image.shape == (*maps.mask.shape, 3)
        assert np.array_equal(image[..., 0] == 255, getattr(maps, kind))


# --- held-out pairs and the subject ---------------------------------------------------------------


def test_held_out_pairs_never_appear_in_the_default_sampler():
    drawn = {scene.pair for scene in sample_scenes(2000, seed=0)}
    assert not drawn & set(HELD_OUT_PAIRS)
    assert drawn == set(world.ALL_PAIRS) - set(HELD_OUT_PAIRS)


def test_held_out_sampler_draws_only_held_out_pairs():
    drawn = [scene.pair for scene in world.held_out_scenes(200, seed=0)]
    assert set(drawn) == set(HELD_OUT_PAIRS)
    assert {s.pair for s in sample_scenes(100, 0, include=[("red", "circle")])} == {("red", "circle")}
    assert {s.pair for s in sample_scenes(3000, 0, exclude=())} == set(world.ALL_PAIRS)


def test_sampler_refuses_unknown_or_empty_pair_sets():
    with pytest.raises(ValueError, match="unknown"):
        sample_scenes(1, 0, include=[("red", "hexagon")])
    with pytest.raises(ValueError, match="no \\(colour, shape\\) pair"):
        sample_scenes(1, 0, include=HELD_OUT_PAIRS, exclude=HELD_OUT_PAIRS)


def test_subject_views_vary_within_what_a_model_can_show_and_are_never_sampled_otherwise():
    views = world.subject_scenes(12, seed=0)
    assert all(v.is_subject and v.shape == world.SUBJECT_SHAPE for v in views)
    assert all(v.caption.startswith(f"a photo of {SUBJECT_TOKEN} on ") for v in views)
    assert len({(v.x, v.y, v.radius) for v in views}) == len(views)
    # Large, on plain backgrounds far from pink and teal (the VAE keeps those; test_metrics checks it).
    assert {(v.size, v.texture) for v in views} == {("large", "plain")}
    assert {v.background for v in views} == set(world.SUBJECT_BACKGROUNDS)
    assert {v.background for v in world.subject_scenes(4, seed=9)} == set(world.SUBJECT_BACKGROUNDS)
    assert not {"purple", "orange"} & set(world.SUBJECT_BACKGROUNDS)
    for view in views:
        (x0, y0, x1, y1), side = render(view)[1].box, 64
        assert min(x0, y0) >= MARGIN * side - 1 and max(x1, y1) <= (1 - MARGIN) * side + 1
    image, maps = world.render_subject(seed=3)
    expected_image, expected_maps = render(world.subject_scene(3))
    assert np.array_equal(image, expected_image) and np.array_equal(maps.mask, expected_maps.mask)
    striped = image[maps.mask & ~maps.edges]
    for stripe in world.SUBJECT_STRIPES:
        assert (striped == stripe).all(axis=1).mean() > 0.2  # both stripe colours show
    assert not any(scene.is_subject for scene in sample_scenes(2000, seed=1, exclude=()))


def test_paint_recolours_only_the_object_in_unnamed_colours():
    scene = sample_scenes(1, seed=4)[0]
    image, maps = render(scene)
    solid, solid_maps = render(scene, paint=[(12, 200, 90)])
    assert np.array_equal(solid_maps.mask, maps.mask) and solid_maps.box == maps.box
    x0, y0, x1, y1 = maps.box
    away = np.ones(maps.mask.shape, dtype=bool)
    away[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = False  # beyond the anti-aliased outline
    assert np.array_equal(solid[away], image[away])  # the background is untouched
    assert (solid[maps.mask & ~maps.edges] == (12, 200, 90)).all()
    banded, _ = render(scene, paint=[(250, 0, 0), (0, 0, 250)])
    inside = banded[maps.mask & ~maps.edges]
    assert {tuple(c) for c in inside} == {(250, 0, 0), (0, 0, 250)}
    # the subject is the star painted in its two stripe colours
    subject = world.subject_scene(0)
    plain = dataclasses.replace(subject, colour="red" if subject.background != "red" else "blue")
    assert np.array_equal(render(plain, paint=world.SUBJECT_STRIPES)[0], render(subject)[0])
    with pytest.raises(ValueError, match="one or two"):
        render(scene, paint=[(0, 0, 0)] * 3)


# --- scorer ---------------------------------------------------------------------------------------


def test_scorer_reads_every_attribute_of_clean_renders(scenes, renders):
    readings = [score_image(image) for image, _ in renders]
    accuracy = attribute_accuracy(readings, scenes)
    assert set(accuracy) == set(ATTRIBUTES)
    assert all(value >= 0.95 for value in accuracy.values()), accuracy
    assert np.mean([mask_iou(r.mask, m.mask) for r, (_, m) in zip(readings, renders)]) > 0.98
    assert np.mean([edge_f1(r.edges, m.edges) for r, (_, m) in zip(readings, renders)]) > 0.98
    assert np.mean([r.box == m.box for r, (_, m) in zip(readings, renders)]) > 0.95
    assert np.mean([r.confidence for r in readings]) > 0.9


def test_scorer_is_robust_to_mild_noise_and_blur(scenes, renders):
    readings = [score_image(degrade(image, seed=i)) for i, (image, _) in enumerate(renders)]
    accuracy = attribute_accuracy(readings, scenes)
    assert all(value >= 0.9 for value in accuracy.values()), accuracy
    assert np.mean([mask_iou(r.mask, m.mask) for r, (_, m) in zip(readings, renders)]) > 0.9


def subject_in_any_view(n: int, seed: int) -> list[Scene]:
    """The subject in every kind of view the world draws (small or large, any background or texture)."""
    stars = sample_scenes(n, seed, include=[(colour, "star") for colour in world.COLOURS])
    return [dataclasses.replace(star, colour=world.SUBJECT_COLOUR) for star in stars]


def test_scorer_recognises_the_subject_and_nothing_else_as_it(renders):
    views = [*world.subject_scenes(10, seed=5), *subject_in_any_view(30, seed=5)]
    assert {v.size for v in views} == set(world.SIZES) and {v.texture for v in views} == set(world.TEXTURES)
    readings = [score_image(render(v)[0]) for v in views]
    assert all(r.is_subject for r in readings)
    assert attribute_accuracy(readings, views)["background"] == 1.0
    assert not any(score_image(image).is_subject for image, _ in renders[:100])


def test_scorer_takes_pil_and_float_images(renders):
    image = renders[0][0]
    reading = score_image(image)
    for other in (score_image(Image.fromarray(image)), score_image(image.astype(np.float32) / 255)):
        assert (other.colour, other.shape, other.size, other.background, other.texture) == (
            reading.colour,
            reading.shape,
            reading.size,
            reading.background,
            reading.texture,
        )
        assert np.array_equal(other.mask, reading.mask)
    with pytest.raises(ValueError, match="expected an"):
        score_image(image[..., 0])


def test_scorer_finds_no_object_on_an_empty_background():
    reading = score_image(np.full((64, 64, 3), world.COLOURS["green"], dtype=np.uint8))
    assert (reading.shape, reading.colour, reading.box, reading.confidence) == (None, None, None, 0.0)
    assert (reading.background, reading.texture) == ("green", "plain") and not reading.mask.any()


def test_attribute_accuracy_counts_matches(scenes, renders):
    readings = [score_image(image) for image, _ in renders[:4]]
    wrong = dataclasses.replace(readings[0], shape="none")
    accuracy = attribute_accuracy([wrong, *readings[1:]], scenes[:4])
    assert accuracy["shape"] == 0.75
    with pytest.raises(ValueError, match="3 readings for 4 scenes"):
        attribute_accuracy(readings[:3], scenes[:4])


# --- metrics --------------------------------------------------------------------------------------


def test_mask_iou_and_edge_f1_sanity():
    a = np.zeros((16, 16), dtype=bool)
    a[4:12, 4:12] = True
    b = np.roll(a, 4, axis=1)  # half of a
    empty = np.zeros_like(a)
    assert mask_iou(a, a) == 1.0 and mask_iou(a, ~a) == 0.0 and mask_iou(empty, empty) == 1.0
    assert mask_iou(a, b) == pytest.approx(32 / 96)
    edges, shifted = world.mask_edges(a), world.mask_edges(np.roll(a, 1, axis=1))
    assert edge_f1(edges, edges) == 1.0 and edge_f1(empty, empty) == 1.0 and edge_f1(edges, empty) == 0.0
    assert edge_f1(edges, shifted, tolerance=1) == 1.0
    assert edge_f1(edges, shifted, tolerance=0) < 0.8
    assert edge_f1(edges, world.mask_edges(np.roll(a, 6, axis=0))) < 0.5
