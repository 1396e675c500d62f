"""Metrics: the world scorer on rendered scenes, caption parsing, probes, deterministic sampling, and
the CLIP / DINO scorers' plumbing on tiny random models saved to a temporary folder.

Pipelines here are random (``weights="random"``): their samples are noise, so these tests check
plumbing, shapes, determinism and errors; the world scorer's accuracy is checked on rendered scenes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from boft_diffusion import world
from boft_diffusion.metrics import (
    EVAL_GUIDANCE,
    EVAL_STEPS,
    GUTTER,
    CombinedScorer,
    DreamBoothProbe,
    EmbeddingScorer,
    MetricsError,
    ScorerError,
    WorldScorer,
    format_metrics,
    grid,
    load_scorer,
    measure_dreambooth,
    reconstruction_fidelity,
    sample_images,
    world_dreambooth_probe,
    world_prompt_accuracy,
)
from boft_diffusion.tiny import build_tiny_pipeline, build_tiny_tokenizer, subject_views
from boft_diffusion.world import (
    ATTRIBUTES,
    SUBJECT_TOKEN,
    TEXTURES,
    Scene,
    caption_of,
    held_out_scenes,
    parse_caption,
    partial_caption,
    render,
    render_subject,
    sample_scenes,
    scene_to_pil,
    subject_scenes,
)

STEPS = 2  # denoising steps for the random pipeline: only plumbing is under test


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0, weights="random")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _subject_views(n: int, seed: int) -> list[Image.Image]:
    return [scene_to_pil(scene) for scene in subject_scenes(n, seed)]


# --- parse_caption ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a photo of a red toy", {"colour": "red"}),
        (
            "a photo of sks toy on a striped green background",
            {"subject": "yes", "background": "green", "texture": "striped"},
        ),
        (
            "a photo of a large star on a blue background",
            {"size": "large", "shape": "star", "background": "blue", "texture": "plain"},
        ),
        ("a photo of sks toy", {"subject": "yes"}),
        ("a photo of a dog on the beach", {}),
        ("a photo of a cat on a blue chair", {}),
        ("", {}),
    ],
)
def test_parse_caption_examples(prompt, expected):
    assert parse_caption(prompt) == expected


def test_parse_caption_inverts_full_captions():
    for scene in [*sample_scenes(200, seed=0), *held_out_scenes(40, seed=1)]:
        expected = {a: getattr(scene, a) for a in ("size", "colour", "shape", "background", "texture")}
        assert parse_caption(caption_of(scene)) == expected, caption_of(scene)


def test_parse_caption_inverts_partial_captions():
    flags = ("size", "colour", "shape", "background")
    for scene in sample_scenes(40, seed=2):
        for keep in itertools.product((True, False), repeat=4):
            kept = dict(zip(flags, keep))
            expected = {a: getattr(scene, a) for a in ("size", "colour", "shape") if kept[a]}
            if kept["background"]:
                expected |= {"background": scene.background, "texture": scene.texture}
            caption = partial_caption(scene, **kept)
            assert parse_caption(caption) == expected, caption


def test_parse_caption_of_subject_scenes():
    for scene in subject_scenes(30, seed=3):
        expected = {"subject": "yes", "background": scene.background, "texture": scene.texture}
        assert parse_caption(caption_of(scene)) == expected


# --- the world scorer ------------------------------------------------------------------------------


def test_world_scorer_knows_the_subject():
    scorer = WorldScorer()
    references = _subject_views(4, seed=0)
    views = [Image.fromarray(render_subject(seed)[0]) for seed in range(10, 16)]
    others = sample_scenes(12, seed=5)
    assert scorer.name == "world"
    assert scorer.subject_similarity(views, references) == pytest.approx([1.0] * len(views), abs=0.02)
    # A world object is never striped: every solid named colour is far from pink and teal, so a star
    # earns about half (its shape), anything else about nothing.
    similarity = scorer.subject_similarity([scene_to_pil(s) for s in others], references)
    for scene, value in zip(others, similarity):
        assert (0.5 <= value < 0.55) if scene.shape == "star" else (value < 0.05), (scene, value)
    stars = [scene_to_pil(s) for s in sample_scenes(3, seed=6, include=[("red", "star")])]
    assert scorer.subject_similarity(stars, references) == [0.5] * 3


def test_world_scorer_gives_graded_credit_for_the_subjects_colours():
    """Like DINO's cosine, the score falls off gradually: stripes drawn muted still earn colour credit."""
    scorer = WorldScorer()
    references = _subject_views(4, seed=0)
    scene = dataclasses.replace(world.subject_scene(21), background="white")  # apart from every paint below
    pink, teal = world.SUBJECT_STRIPES
    plain = dataclasses.replace(scene, colour="red")

    def painted(a, b):
        return Image.fromarray(render(plain, paint=[a, b])[0])

    exact, muted, wrong = scorer.subject_similarity(
        [
            painted(pink, teal),
            painted(tuple(int(0.75 * v + 32) for v in pink), tuple(int(0.75 * v + 32) for v in teal)),
            painted((255, 255, 0), (0, 0, 255)),
        ],
        references,
    )
    assert exact == pytest.approx(1.0, abs=0.02)
    assert 0.6 < muted < exact
    assert wrong == pytest.approx(0.5, abs=0.02)  # the right shape in the wrong colours
    assert world.colour_distance([pink, teal], [teal, pink]) == 0.0  # tones match either way round
    assert world.colour_distance([pink], [pink, pink]) == 0.0  # a solid colour is two equal tones


def test_world_scorer_subject_is_the_references_majority():
    red_circles = [scene_to_pil(s) for s in sample_scenes(3, seed=0, include=[("red", "circle")])]
    scorer = WorldScorer()
    references = [*red_circles, *_subject_views(1, seed=0)]  # three red circles outvote one subject view
    assert scorer.subject_similarity(red_circles[:1] + _subject_views(1, seed=9), references) == [1.0, 0.0]
    with pytest.raises(MetricsError, match="reference"):
        scorer.subject_similarity(red_circles, [])


def test_world_prompt_agreement():
    scorer = WorldScorer()
    scenes = sample_scenes(8, seed=7)
    images = [scene_to_pil(scene) for scene in scenes]
    assert scorer.prompt_agreement(images, [caption_of(s) for s in scenes]) == [1.0] * len(scenes)
    partial = [partial_caption(s, size=False, shape=False) for s in scenes]
    assert scorer.prompt_agreement(images, partial) == [1.0] * len(scenes)
    # Another background colour: 4 of the 5 stated attributes still hold.
    wrong = [
        caption_of(
            Scene(
                s.shape,
                s.colour,
                s.size,
                next(c for c in ("white", "red", "blue") if c not in (s.colour, s.background)),
                s.texture,
            )
        )
        for s in scenes
    ]
    assert scorer.prompt_agreement(images, wrong) == [pytest.approx(0.8)] * len(scenes)
    subject = _subject_views(1, seed=0)
    assert scorer.prompt_agreement(subject, [caption_of(subject_scenes(1, seed=0)[0])]) == [1.0]


@pytest.mark.parametrize("prompt", ["a photo of a dog", f"a photo of {SUBJECT_TOKEN}"])
def test_world_prompt_agreement_needs_a_checkable_attribute(prompt):
    with pytest.raises(MetricsError, match="states no attribute of the world") as error:
        WorldScorer().prompt_agreement(_subject_views(1, seed=0), [prompt])
    assert repr(prompt) in str(error.value)


def test_world_prompt_agreement_needs_one_prompt_per_image():
    with pytest.raises(MetricsError, match="2 images for 1 prompts"):
        WorldScorer().prompt_agreement(_subject_views(2, seed=0), ["a photo of a red circle"])


# --- probes -----------------------------------------------------------------------------------------


def test_world_probe_defaults():
    probe = world_dreambooth_probe()
    assert (probe.instance_prompt, probe.class_prompt) == ("a photo of sks toy", "a photo of a toy")
    assert (probe.num_inference_steps, probe.guidance_scale) == (EVAL_STEPS, EVAL_GUIDANCE) == (20, 4.0)
    stated = [parse_caption(p) for p in probe.context_prompts]
    assert len(stated) == 4 and all(s["subject"] == "yes" for s in stated)
    assert sorted(s["texture"] for s in stated) == sorted(TEXTURES)
    assert len({s["background"] for s in stated}) == 4
    assert "on an orange background" in " ".join(probe.context_prompts)  # the world's article grammar
    assert world_dreambooth_probe(num_images=2, seed=3).num_images == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"context_prompts": ()}, "context_prompts is empty"),
        ({"context_prompts": ["a photo of sks toy", "  "]}, r"context_prompts \[1\] are blank"),
        ({"context_prompts": "a photo of sks toy"}, "not one string"),
        ({"instance_prompt": ""}, "instance_prompt must be a non-empty prompt"),
        ({"class_prompt": " "}, "class_prompt must be a non-empty prompt"),
        ({"num_images": 0}, "num_images must be an integer >= 1, got 0"),
        ({"num_inference_steps": 0}, "num_inference_steps must be an integer >= 1"),
        ({"guidance_scale": 0.5}, "guidance_scale must be finite and >= 1"),
        ({"guidance_scale": math.inf}, "guidance_scale must be finite"),
        ({"guidence_scale": 2.0}, "unknown probe field.*guidence_scale"),
    ],
)
def test_probe_validation(overrides, message):
    with pytest.raises(MetricsError, match=message):
        world_dreambooth_probe(**overrides)


def test_probe_accepts_no_guidance_and_lists():
    probe = DreamBoothProbe(
        "a photo of sks toy", "a photo of a toy", ["a photo of sks toy"], guidance_scale=0
    )
    assert probe.context_prompts == ("a photo of sks toy",)


# --- sampling and measurements ------------------------------------------------------------------------


def test_sample_images_is_deterministic_per_prompt_and_index(pipe):
    prompts = ["a photo of sks toy", "a photo of a red circle on a blue background"]
    rng_before = torch.get_rng_state()
    a = sample_images(pipe, prompts, 3, seed=5, num_inference_steps=STEPS, guidance_scale=4.0, batch_size=4)
    b = sample_images(
        pipe, prompts[::-1], 2, seed=5, num_inference_steps=STEPS, guidance_scale=4.0, batch_size=1
    )
    assert torch.equal(torch.get_rng_state(), rng_before)  # per-image generators: the global RNG is untouched
    assert [len(images) for images in a] == [3, 3] and [len(images) for images in b] == [2, 2]
    assert all(image.size == (64, 64) and image.mode == "RGB" for images in a for image in images)
    for (p, i), (q, j) in [((0, 0), (1, 0)), ((0, 1), (1, 1)), ((1, 1), (0, 1))]:
        # Same prompt and index: the same image, up to float rounding of batched kernels (1 level of 255).
        assert np.abs(_pixels(a[p][i]) - _pixels(b[q][j])).max() <= 1
    assert np.abs(_pixels(a[0][0]) - _pixels(a[0][1])).mean() > 5  # another index: another image


@pytest.mark.parametrize(
    ("prompts", "message"),
    [([], "non-empty list"), ("a toy", "non-empty list"), (["a toy", ""], r"\[1\] are blank")],
)
def test_sample_images_refuses_bad_prompts(pipe, prompts, message):
    with pytest.raises(MetricsError, match=message):
        sample_images(pipe, prompts, 1, seed=0, num_inference_steps=STEPS, guidance_scale=1.0)


@pytest.mark.parametrize("scorer_kind", ["world", "dino"])
def test_measure_dreambooth_plumbing(pipe, scorer_kind, request):
    scorer = (
        WorldScorer()
        if scorer_kind == "world"
        else EmbeddingScorer(request.getfixturevalue("dino_dir"), "dino")
    )
    probe = world_dreambooth_probe(num_images=1, num_inference_steps=STEPS)
    measurement = measure_dreambooth(pipe, probe, _subject_views(3, seed=0), scorer)
    assert set(measurement.metrics) == {"subject_fidelity", "prompt_fidelity", "class_drift"}
    assert set(measurement.per_prompt) == {probe.instance_prompt, probe.class_prompt, *probe.context_prompts}
    for name, value in measurement.metrics.items():
        if name == "prompt_fidelity" and scorer_kind == "dino":
            assert value is None
        else:
            assert 0.0 <= value <= 1.0, (name, value)
    assert list(measurement.samples) == [probe.instance_prompt, probe.class_prompt, *probe.context_prompts]
    assert all(len(images) == 1 for images in measurement.samples.values())


class ScenePipe:
    """A stand-in pipeline that draws, for each prompt, the scene ``draw(prompt)`` (any seed, any steps)."""

    def __init__(self, draw):
        self.draw = draw

    def __call__(self, prompt, generator, **_):
        return type("Output", (), {"images": [scene_to_pil(self.draw(p)) for p in prompt]})()


def test_subject_fidelity_averages_the_instance_and_every_context_prompt():
    """The paper's DINO / CLIP-I: the mean over all prompts' samples, and each prompt's own value."""
    probe = world_dreambooth_probe(num_images=2)
    red_circle = Scene("circle", "red", "large", "blue")

    def draw(prompt):  # the subject only in its contexts; a red circle for the bare prompt and the class
        stated = parse_caption(prompt)
        if "background" not in stated:
            return red_circle
        return Scene("star", world.SUBJECT_COLOUR, "large", stated["background"], stated["texture"])

    result = measure_dreambooth(ScenePipe(draw), probe, _subject_views(3, seed=0), WorldScorer())
    contexts = probe.context_prompts
    assert result.metrics == pytest.approx(
        {"subject_fidelity": 4 / 5, "prompt_fidelity": 1.0, "class_drift": 0.0}, abs=0.03
    )  # 0 for the bare instance prompt, 1 for each of the four contexts
    assert list(result.per_prompt) == [probe.instance_prompt, *contexts, probe.class_prompt]
    assert result.per_prompt[probe.instance_prompt] == {"subject_fidelity": pytest.approx(0.0, abs=0.03)}
    for prompt in contexts:
        assert result.per_prompt[prompt] == pytest.approx(
            {"subject_fidelity": 1.0, "prompt_fidelity": 1.0}, abs=0.03
        )
    assert result.per_prompt[probe.class_prompt] == {"class_drift": result.metrics["class_drift"]}
    subject = [result.per_prompt[p]["subject_fidelity"] for p in (probe.instance_prompt, *contexts)]
    assert result.metrics["subject_fidelity"] == pytest.approx(sum(subject) / len(subject))


def test_format_metrics_lists_each_prompt():
    before = {"subject_fidelity": 0.1, "prompt_fidelity": 0.5, "class_drift": 0.0}
    after = {"subject_fidelity": 0.4, "prompt_fidelity": None, "class_drift": 0.2}
    per_prompt = {
        "before": {"a photo of sks toy": {"subject_fidelity": 0.25}},
        "after": {"a photo of sks toy": {"subject_fidelity": 0.5}, "a photo of a toy": {"class_drift": 0.2}},
    }
    lines = format_metrics(before, after, "world", per_prompt).splitlines()
    assert lines[:2] == ["What it taught (scorer: world):", "  metric              before   after"]
    assert lines[3].split() == ["prompt_fidelity", "0.500", "-"]
    assert lines[5] == "  per prompt:"
    assert lines[6].split() == ["subject_fidelity", "0.250", "0.500", "a", "photo", "of", "sks", "toy"]
    assert lines[7].split()[:3] == ["class_drift", "-", "0.200"]
    assert format_metrics(before, after, "world") == "\n".join(lines[:5])


def test_the_default_subject_views_survive_the_shipped_vae():
    """The ship check: every default instance view, encoded and decoded by the shipped tiny VAE, still
    scores >= 0.7 as the subject (the comparison subject fidelity makes). A view below that caps what any
    finetuning can show (small stars and checkered backgrounds reconstructed at 0.10-0.26)."""
    vae = build_tiny_pipeline().vae
    views = subject_views()
    assert len(views) == 5
    ceiling = reconstruction_fidelity(vae, views)
    assert min(ceiling) >= 0.7, ceiling
    # eval compares with the very images the quickstart trains on
    from boft_diffusion.commands.eval import instance_images

    assert [np.asarray(i).tolist() for i in instance_images(None)] == [np.asarray(i).tolist() for i in views]
    # what a view of the old kind scores: a small star on a checkered background
    small = Scene("star", world.SUBJECT_COLOUR, "small", "orange", "checkered", x=0.3, y=0.6, radius=0.18)
    assert reconstruction_fidelity(vae, [scene_to_pil(small)], WorldScorer())[0] < 0.5


def test_reconstruction_fidelity_needs_images():
    with pytest.raises(MetricsError, match="no images"):
        reconstruction_fidelity(build_tiny_pipeline(weights="random").vae, [])


def test_measure_dreambooth_needs_instance_images(pipe):
    with pytest.raises(MetricsError, match="no instance images"):
        measure_dreambooth(pipe, world_dreambooth_probe(num_images=1), [], WorldScorer())


def test_world_prompt_accuracy_plumbing(pipe):
    accuracy = world_prompt_accuracy(pipe, 2, held_out=True, num_inference_steps=STEPS)
    assert set(accuracy) == set(ATTRIBUTES)
    assert all(value in (0.0, 0.5, 1.0) for value in accuracy.values())
    with pytest.raises(MetricsError, match="num_prompts"):
        world_prompt_accuracy(pipe, 0)


def test_grid_layout():
    red, blue = Image.new("RGB", (8, 6), "red"), Image.new("RGB", (8, 6), "blue")
    image = grid([[red, blue, red], [blue, red]])
    assert image.size == (3 * 8 + 2 * GUTTER, 2 * 6 + GUTTER)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((8 + GUTTER, 0)) == (0, 0, 255)
    assert image.getpixel((8, 0)) == (255, 255, 255)  # gutter
    assert image.getpixel((0, 6 + GUTTER)) == (0, 0, 255)
    assert image.getpixel((2 * (8 + GUTTER), 6 + GUTTER)) == (255, 255, 255)  # the short row's missing cell
    with pytest.raises(MetricsError, match="one size"):
        grid([[red, Image.new("RGB", (4, 4))]])
    with pytest.raises(MetricsError, match="at least one image"):
        grid([[]])


# --- embedding scorers on tiny random models -----------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = build_tiny_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2)
    text |= dict(num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id)
    text |= dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37)
    vision |= dict(num_hidden_layers=2, num_attention_heads=4)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
            folder
        )
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dino")
    sizes = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37)
    config = Dinov2Config(**sizes, num_hidden_layers=2, num_attention_heads=4)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Dinov2Model(config).save_pretrained(folder)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


def _two_images() -> list[Image.Image]:
    return [_subject_views(1, seed=0)[0], scene_to_pil(sample_scenes(1, seed=4)[0])]


@pytest.mark.parametrize("kind", ["clip", "dino"])
def test_embedding_subject_similarity(kind, request):
    scorer = EmbeddingScorer(request.getfixturevalue(f"{kind}_dir"), kind)
    images = _two_images()
    similarity = scorer.subject_similarity(images, images[:1])
    assert scorer.name == kind and len(similarity) == 2
    assert all(0.0 <= s <= 1.0 for s in similarity)
    assert similarity[0] == pytest.approx(1.0, abs=1e-5)  # an image against itself
    assert scorer.subject_similarity([], images) == []


def test_clip_prompt_agreement(clip_dir):
    scorer = EmbeddingScorer(clip_dir, "clip")
    images = _two_images()
    agreement = scorer.prompt_agreement(images, ["a photo of sks toy on a blue background", "a red circle"])
    assert len(agreement) == 2 and all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in agreement)
    # CLIP-T reads the prompt without the identifier, which CLIP never learned.
    assert scorer.prompt_agreement(images[:1], ["a photo of sks toy"]) == pytest.approx(
        scorer.prompt_agreement(images[:1], ["a photo of toy"]), abs=1e-6
    )


def test_dino_reads_no_text(dino_dir):
    assert EmbeddingScorer(dino_dir, "dino").prompt_agreement(_two_images(), ["a", "b"]) is None


def test_load_scorer_combines(clip_dir, dino_dir):
    images = _two_images()
    combined = load_scorer(f"dino:{dino_dir},clip:{clip_dir}")
    assert isinstance(combined, CombinedScorer) and combined.name == "dino+clip"
    dino = EmbeddingScorer(dino_dir, "dino")
    assert combined.subject_similarity(images, images) == pytest.approx(
        dino.subject_similarity(images, images)
    )
    assert len(combined.prompt_agreement(images, ["a photo of sks toy", "a photo of a toy"])) == 2
    assert load_scorer(f"dino:{dino_dir},world").name == "dino+world"
    assert isinstance(load_scorer("world"), WorldScorer)
    assert load_scorer(f"clip:{clip_dir}").name == "clip"


def test_scorer_errors_name_the_path(tmp_path, clip_dir, dino_dir):
    missing = tmp_path / "missing"
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"not a model")
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((clip_dir / "config.json").read_text())
    cases = [
        (f"clip:{missing}", missing, "does not exist"),
        (f"dino:{a_file}", a_file, "is a file, not a folder"),
        (f"clip:{empty}", empty, "no config.json"),
        (f"clip:{dino_dir}", dino_dir, "'dinov2' model, not a clip model"),
        (f"dino:{clip_dir}", clip_dir, "'clip' model, not a dino model"),
        (f"clip:{no_weights}", no_weights, "could not load"),
    ]
    for spec, path, message in cases:
        with pytest.raises(ScorerError, match=message) as error:
            load_scorer(spec)
        assert str(path) in str(error.value), spec


@pytest.mark.parametrize("spec", ["", "clip", "clip:", "sift:/x", "world:/x", "world,world,world"])
def test_unknown_scorer_spec_lists_the_forms(spec):
    with pytest.raises(ScorerError, match='"clip:PATH", "dino:PATH"'):
        load_scorer(spec)


def test_pair_needs_a_text_scorer_second(clip_dir, dino_dir):
    with pytest.raises(ScorerError, match="must read text"):
        load_scorer(f"clip:{clip_dir},dino:{dino_dir}")
