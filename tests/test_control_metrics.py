"""Control fidelity: world validation cases, the detectors, and measure_control with stand-in samplers.

No pipeline runs here: a "sampler" is a plain function of (prompts, conditions, seeds), so the scores
of exact renders (perfect control), grey images (no control) and other scenes' renders (the wrong
geometry) can be checked directly.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from boft_diffusion.metrics import (
    CONTROL_METRICS,
    CONTROL_SEED,
    GUTTER,
    ControlCase,
    ControlProbe,
    EdgeDetector,
    Measurement,
    MetricsError,
    WorldControlDetector,
    before_after_control_rows,
    cases_from_conditions,
    format_metrics,
    grid,
    load_control_detector,
    measure_control,
    world_control_cases,
)
from boft_diffusion.world import caption_of, condition_image, edge_f1, render, sample_scenes

NUM_CASES = 8


@pytest.fixture(scope="module")
def cases() -> list[ControlCase]:
    return world_control_cases(NUM_CASES)


def _renders_of(scenes, size: int = 64) -> list[Image.Image]:
    return [Image.fromarray(render(scene, size)[0]) for scene in scenes]


def _sampler_from(cases: list[ControlCase], images: list[Image.Image], calls: list | None = None):
    """A sampler that answers each case's condition with its image (whatever the seed)."""
    by_condition = {id(case.condition): image for case, image in zip(cases, images)}

    def sample(prompts, conditions, seeds):
        if calls is not None:
            calls.append((list(prompts), list(conditions), list(seeds)))
        return [by_condition[id(condition)] for condition in conditions]

    return sample


def _grey(prompts, conditions, seeds):
    return [Image.new("RGB", (64, 64), (128, 128, 128)) for _ in prompts]


def _plain_scenes(n: int, seed: int):
    return [scene for scene in sample_scenes(8 * n, seed) if scene.texture == "plain"][:n]


# --- cases -----------------------------------------------------------------------------------------


def test_world_cases_are_deterministic_held_out_scenes(cases):
    again = world_control_cases(NUM_CASES)
    scenes = sample_scenes(NUM_CASES, CONTROL_SEED)
    assert [c.prompt for c in cases] == [c.prompt for c in again] == [caption_of(s) for s in scenes]
    for case, twin, scene in zip(cases, again, scenes):
        maps = render(scene, 64)[1]
        assert case.condition.tobytes() == twin.condition.tobytes() == condition_image(maps).tobytes()
        assert case.condition.mode == "RGB" and case.condition.size == (64, 64)
        assert set(case.target) == {"edges", "mask"}
        np.testing.assert_array_equal(case.target["edges"], maps.edges)
        np.testing.assert_array_equal(case.target["mask"], maps.mask)
    # The pretraining script draws its denoiser's scenes from seed 10_000: the default stream is another.
    assert [c.prompt for c in cases] != [caption_of(s) for s in sample_scenes(NUM_CASES, 10_000)]
    assert [c.prompt for c in world_control_cases(NUM_CASES, seed=1)] != [c.prompt for c in cases]


def test_world_cases_of_mask_kind_keep_both_targets():
    (case,) = world_control_cases(1, kind="mask", resolution=96)
    assert case.condition.size == (96, 96) and set(case.target) == {"edges", "mask"}
    white = np.asarray(case.condition)[..., 0] == 255
    np.testing.assert_array_equal(white, case.target["mask"])
    assert case.target["edges"].sum() < case.target["mask"].sum()


def test_cases_from_conditions_binarise_luminance():
    levels = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    grey = Image.fromarray(levels, mode="L")
    rgb = Image.fromarray(np.repeat(levels[..., None], 3, axis=2), mode="RGB")
    (edges, mask) = cases_from_conditions(["a", "b"], [grey, rgb], kind="edges")
    assert list(edges.target) == ["edges"]
    np.testing.assert_array_equal(edges.target["edges"], [[False, False, True, True]])
    np.testing.assert_array_equal(mask.target["edges"], [[False, False, True, True]])
    (high,) = cases_from_conditions(["c"], [rgb], kind="mask", threshold=200)
    assert list(high.target) == ["mask"]
    np.testing.assert_array_equal(high.target["mask"], [[False, False, False, True]])
    assert high.target["mask"].dtype == bool and high.prompt == "c" and high.condition is rgb


def test_cases_from_conditions_recover_world_targets(cases):
    for kind in ("edges", "mask"):
        world = world_control_cases(3, kind=kind)
        rebuilt = cases_from_conditions([c.prompt for c in world], [c.condition for c in world], kind=kind)
        for ours, theirs in zip(rebuilt, world):
            np.testing.assert_array_equal(ours.target[kind], theirs.target[kind])


# --- detectors -------------------------------------------------------------------------------------


def test_world_detector_reads_exact_maps_and_nothing_on_grey(cases):
    detector = WorldControlDetector()
    assert detector.name == "world" and detector.maps == ("edges", "mask")
    for scene in sample_scenes(4, CONTROL_SEED):
        image, maps = render(scene)
        read = detector.read(Image.fromarray(image))
        np.testing.assert_array_equal(read["mask"], maps.mask)
        np.testing.assert_array_equal(read["edges"], maps.edges)
    read = detector.read(Image.new("RGB", (48, 40), (128, 128, 128)))
    assert {k: (v.shape, v.any()) for k, v in read.items()} == {
        "edges": ((40, 48), False),
        "mask": ((40, 48), False),
    }


def test_edge_detector_finds_the_renderers_edges():
    """A fair stand-in for Canny: on plain backgrounds it finds the object's outline, also under noise."""
    detector = EdgeDetector()
    assert detector.name == "edges" and detector.maps == ("edges",)
    rng = np.random.default_rng(0)
    scores = []
    for scene in _plain_scenes(24, seed=5):
        image, maps = render(scene)
        noisy = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        for pixels in (image, noisy):
            found = detector.read(Image.fromarray(pixels))["edges"]
            assert found.dtype == bool and found.shape == maps.edges.shape
            scores.append(edge_f1(found, maps.edges))
    assert min(scores) >= 0.8, scores
    assert np.mean(scores) >= 0.95


def test_edge_detector_thins_and_ignores_flat_images():
    image, maps = render(_plain_scenes(1, seed=6)[0])
    found = EdgeDetector(blur=0).read(Image.fromarray(image))["edges"]
    # One pixel thick: about as many edge pixels as the renderer's outline, not two or three times as many.
    assert 0.7 * maps.edges.sum() <= found.sum() <= 1.3 * maps.edges.sum()
    flat = Image.new("RGB", (32, 32), (10, 200, 30))
    assert not EdgeDetector().read(flat)["edges"].any()
    faint = Image.fromarray(np.tile(np.array([100, 104], dtype=np.uint8).repeat(16), (32, 1)))
    assert not EdgeDetector().read(faint)["edges"].any()  # a 4-level step is below min_contrast


def test_edge_detector_sees_edges_between_colours_of_equal_luminance():
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, :16] = (220, 30, 30)  # the world's red and blue: 12 grey levels apart
    pixels[:, 16:] = (30, 70, 220)
    found = EdgeDetector(blur=0).read(Image.fromarray(pixels))["edges"]
    assert found[:, 15:17].any(axis=1).all() and not found[:, :14].any() and not found[:, 18:].any()


def test_load_control_detector():
    assert isinstance(load_control_detector("world"), WorldControlDetector)
    assert isinstance(load_control_detector("edges"), EdgeDetector)
    assert load_control_detector("none") is None
    with pytest.raises(MetricsError, match="'world', 'edges', 'none'"):
        load_control_detector("canny")


# --- measure_control -------------------------------------------------------------------------------


def test_perfect_control_scores_near_one(cases):
    sample = _sampler_from(cases, _renders_of(sample_scenes(NUM_CASES, CONTROL_SEED)))
    result = measure_control(sample, ControlProbe(tuple(cases)), WorldControlDetector())
    assert set(result.metrics) == set(CONTROL_METRICS.values())
    assert result.metrics["control_edge_f1"] >= 0.95
    assert result.metrics["control_mask_iou"] >= 0.95


def test_no_control_scores_zero(cases):
    result = measure_control(_grey, ControlProbe(tuple(cases)), WorldControlDetector())
    assert result.metrics == {"control_edge_f1": 0.0, "control_mask_iou": 0.0}


def test_the_wrong_geometry_scores_clearly_lower(cases):
    probe = ControlProbe(tuple(cases))
    perfect = measure_control(
        _sampler_from(cases, _renders_of(sample_scenes(NUM_CASES, CONTROL_SEED))),
        probe,
        WorldControlDetector(),
    )
    others = measure_control(
        _sampler_from(cases, _renders_of(sample_scenes(NUM_CASES, 7))), probe, WorldControlDetector()
    )
    for name in ("control_edge_f1", "control_mask_iou"):
        assert others.metrics[name] < perfect.metrics[name] - 0.4, (name, others.metrics, perfect.metrics)


def test_edge_detector_on_a_users_edge_conditions():
    """The user's path: targets binarised from the edge conditions, edges detected on the samples."""
    scenes = _plain_scenes(6, seed=8)
    world = [render(scene)[1] for scene in scenes]
    cases = cases_from_conditions([caption_of(s) for s in scenes], [condition_image(m) for m in world])
    probe = ControlProbe(tuple(cases))
    result = measure_control(_sampler_from(cases, _renders_of(scenes)), probe, EdgeDetector())
    assert result.metrics["control_edge_f1"] >= 0.9
    assert result.metrics["control_mask_iou"] is None  # no case holds a mask: shown as "-"
    table = format_metrics(None, result.metrics, "edges").splitlines()
    assert [line.split() for line in table if "control_mask_iou" in line] == [["control_mask_iou", "-", "-"]]
    shuffled = _sampler_from(cases, _renders_of(scenes[1:] + scenes[:1]))
    assert measure_control(shuffled, probe, EdgeDetector()).metrics["control_edge_f1"] < 0.5


@pytest.mark.parametrize("size", [48, 256])
def test_samples_of_another_size_are_compared_at_the_targets_size(cases, size):
    """Read at 4x the size, a thin outline survives the resize (nearest-neighbour would drop most of it)."""
    sample = _sampler_from(cases, _renders_of(sample_scenes(NUM_CASES, CONTROL_SEED), size=size))
    result = measure_control(sample, ControlProbe(tuple(cases)), WorldControlDetector())
    assert result.metrics["control_mask_iou"] >= 0.85
    assert result.metrics["control_edge_f1"] >= 0.9
    condition, image = result.samples[f"0: {cases[0].prompt}"]
    assert condition.size == image.size == (size, size)


def test_sampling_is_chunked_with_per_image_seeds(cases):
    calls: list = []
    four = cases[:4]
    sample = _sampler_from(four, _renders_of(sample_scenes(4, CONTROL_SEED)), calls)
    measure_control(
        sample, ControlProbe(tuple(four), num_images=2, seed=5), WorldControlDetector(), batch_size=3
    )
    assert [len(prompts) for prompts, _, _ in calls] == [3, 3, 2]
    prompts = [p for call in calls for p in call[0]]
    conditions = [c for call in calls for c in call[1]]
    seeds = [s for call in calls for s in call[2]]
    assert prompts == [case.prompt for case in four for _ in range(2)]
    assert all(c is case.condition for c, case in zip(conditions, [case for case in four for _ in range(2)]))
    assert seeds == [5, 6] * 4


def test_grid_rows_show_the_condition_once(cases):
    two = cases[:2]
    renders = _renders_of(sample_scenes(2, CONTROL_SEED))
    probe = ControlProbe(tuple(two), num_images=3)
    before = measure_control(_grey, probe, WorldControlDetector())
    after = measure_control(_sampler_from(two, renders), probe, WorldControlDetector())
    assert list(after.samples) == [f"{i}: {case.prompt}" for i, case in enumerate(two)]
    for case, images in zip(two, after.samples.values()):
        assert len(images) == 4 and images[0].tobytes() == case.condition.tobytes()
    rows = before_after_control_rows(before, after)
    assert [len(row) for row in rows] == [7, 7]
    for row, case, render_ in zip(rows, two, renders):
        assert row[0].tobytes() == case.condition.tobytes()
        assert all(np.asarray(image).std() == 0 for image in row[1:4])  # grey: before
        assert all(image is render_ for image in row[4:])  # the renders: after
    assert [len(row) for row in before_after_control_rows(None, after)] == [4, 4]
    sheet = grid(rows)
    assert sheet.size == (7 * 64 + 6 * GUTTER, 2 * 64 + GUTTER)


# --- errors ----------------------------------------------------------------------------------------

_CONDITION = Image.new("RGB", (8, 6))
_TARGET = np.zeros((6, 8), dtype=bool)


@pytest.mark.parametrize(
    ("prompt", "condition", "target", "match"),
    [
        (None, _CONDITION, {"edges": _TARGET}, "prompt must be a string"),
        ("p", _TARGET, {"edges": _TARGET}, "condition must be a PIL image"),
        ("p", _CONDITION, {}, "needs a target"),
        ("p", _CONDITION, [_TARGET], "needs a target"),
        ("p", _CONDITION, {"depth": _TARGET}, "unknown target map"),
        ("p", _CONDITION, {"edges": _TARGET.T}, "condition's own geometry"),
        ("p", _CONDITION, {"mask": np.zeros((6, 8, 3))}, "2-D"),
    ],
)
def test_control_case_errors(prompt, condition, target, match):
    with pytest.raises(MetricsError, match=match):
        ControlCase(prompt, condition, target)


def test_control_case_stores_bool_maps():
    case = ControlCase("", _CONDITION, {"mask": np.ones((6, 8), dtype=np.uint8)})
    assert case.target["mask"].dtype == bool and case.target["mask"].all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_cases": 0}, "num_cases must be an integer >= 1"),
        ({"kind": "depth"}, "unknown condition kind 'depth'"),
        ({"resolution": 8}, "resolution must be an integer >= 16"),
    ],
)
def test_world_control_cases_errors(kwargs, match):
    with pytest.raises(MetricsError, match=match):
        world_control_cases(**kwargs)


@pytest.mark.parametrize(
    ("prompts", "conditions", "kwargs", "match"),
    [
        ([], [], {}, "at least one prompt"),
        (["a", "b"], [_CONDITION], {}, "2 prompts for 1 condition images"),
        ("a", [_CONDITION], {}, "not one string"),
        (["a"], [_CONDITION], {"kind": "pose"}, "unknown condition kind 'pose'"),
        (["a"], [_CONDITION], {"threshold": 0}, r"threshold must be .* \[1, 255\]"),
        (["a"], [_CONDITION], {"threshold": 256}, r"threshold must be .* \[1, 255\]"),
        (["a"], [_CONDITION], {"threshold": 127.5}, r"threshold must be .* \[1, 255\]"),
        (["a"], [_TARGET], {}, "condition 0 must be a PIL image"),
    ],
)
def test_cases_from_conditions_errors(prompts, conditions, kwargs, match):
    with pytest.raises(MetricsError, match=match):
        cases_from_conditions(prompts, conditions, **kwargs)


def test_control_probe_errors(cases):
    with pytest.raises(MetricsError, match="at least one case"):
        ControlProbe(())
    with pytest.raises(MetricsError, match="not one case"):
        ControlProbe(cases[0])
    with pytest.raises(MetricsError, match=r"cases \[1\] are not ControlCase"):
        ControlProbe((cases[0], "a photo"))
    with pytest.raises(MetricsError, match="num_images must be an integer >= 1"):
        ControlProbe(tuple(cases), num_images=0)
    with pytest.raises(MetricsError, match="seed must be an integer"):
        ControlProbe(tuple(cases), seed=1.5)
    assert ControlProbe(list(cases)).cases == tuple(cases)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"blur": -1}, "blur must be a finite number >= 0"),
        ({"min_contrast": float("nan")}, "min_contrast must be a finite number >= 0"),
        ({"threshold": 0}, r"threshold is a fraction .* \(0, 1\]"),
        ({"threshold": 1.5}, r"threshold is a fraction .* \(0, 1\]"),
    ],
)
def test_edge_detector_errors(kwargs, match):
    with pytest.raises(MetricsError, match=match):
        EdgeDetector(**kwargs)


def test_measure_control_errors(cases):
    probe = ControlProbe(tuple(cases[:2]), num_images=2)
    with pytest.raises(MetricsError, match="returned 1 images for 4"):
        measure_control(lambda p, c, s: _grey(p, c, s)[:1], probe, WorldControlDetector())
    with pytest.raises(MetricsError, match="returned a generator for 4"):
        measure_control(lambda p, c, s: (image for image in _grey(p, c, s)), probe, WorldControlDetector())
    with pytest.raises(MetricsError, match=r"other than a PIL image for jobs \[0, 1, 2, 3\]"):
        measure_control(lambda p, c, s: [np.zeros((64, 64, 3))] * len(p), probe, WorldControlDetector())
    with pytest.raises(MetricsError, match="batch_size must be an integer >= 1"):
        measure_control(_grey, probe, WorldControlDetector(), batch_size=0)
    masks = ControlProbe(tuple(cases_from_conditions(["a"], [cases[0].condition], kind="mask")))
    with pytest.raises(MetricsError, match="reads edges but the cases' targets are mask"):
        measure_control(_grey, masks, EdgeDetector())

    class Broken:
        name, maps = "broken", ("edges",)

        def read(self, image):
            return {"edges": np.zeros((64, 64, 3), dtype=bool)}

    with pytest.raises(MetricsError, match="detected 'edges' must be a 2-D"):
        measure_control(_grey, probe, Broken())


def test_measurement_is_the_shared_type(cases):
    result = measure_control(_grey, ControlProbe(tuple(cases[:1])), WorldControlDetector())
    assert isinstance(result, Measurement)
