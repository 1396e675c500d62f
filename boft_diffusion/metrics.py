"""What a recipe taught, measured as the papers measure it.

DreamBooth (Ruiz et al., CVPR 2023) scores a finetuned model by sampling prompts and comparing:

    subject_fidelity  samples of the instance prompt ("a photo of sks toy") against the instance images:
                      the paper's DINO and CLIP-I, the mean cosine of image embeddings
    prompt_fidelity   samples of context prompts ("... sks toy on a striped green background") against
                      their prompts: the paper's CLIP-T, the cosine of image and text embeddings
    class_drift       samples of the class prompt ("a photo of a toy") against the instance images:
                      the paper's PRES (prior preservation); high means the subject leaked into its class

A :class:`Scorer` supplies the two comparisons. :class:`EmbeddingScorer` runs the papers' CLIP or DINO
from a local folder; :class:`WorldScorer` reads samples of the embedded world with its exact scorer
(:func:`~boft_diffusion.world.score_image`), offline and without weights: an image's likeness to the
subject is graded, as DINO's cosine is (half for its colours, by their RGB distance to the subject's,
half for reading as the subject's shape), and it obeys a prompt by the share of the prompt's
attributes it reads back. :func:`world_prompt_accuracy` asks the same of full world captions, per
attribute (GenEval-style attribute binding, read by the world scorer instead of a detector).

Sampling is deterministic: image ``i`` of every prompt starts from its own generator seeded
``seed + i``, so it does not depend on batching or on how many images are asked for.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image

from .tiny import TINY_CLASS_PROMPT, TINY_INSTANCE_PROMPT
from .world import (
    ATTRIBUTES,
    SUBJECT_COLOUR,
    SUBJECT_TOKEN,
    Scene,
    aligned_tones,
    attribute_accuracy,
    caption_of,
    colour_distance,
    held_out_scenes,
    parse_caption,
    sample_scenes,
    score_image,
)

__all__ = [
    "EVAL_GUIDANCE",
    "EVAL_STEPS",
    "CombinedScorer",
    "DreamBoothProbe",
    "EmbeddingScorer",
    "Measurement",
    "MetricsError",
    "Scorer",
    "ScorerError",
    "WorldScorer",
    "before_after_rows",
    "format_metrics",
    "grid",
    "load_scorer",
    "measure_dreambooth",
    "sample_images",
    "world_dreambooth_probe",
    "world_prompt_accuracy",
]

EVAL_STEPS = 20
"""Default denoising steps when sampling for a measurement."""
EVAL_GUIDANCE = 4.0
"""Default classifier-free guidance scale when sampling for a measurement."""
GUTTER = 2
"""White pixels between the cells of a :func:`grid`."""
EMBED_BATCH = 32
"""Images or prompts per forward pass of an embedding model."""
SCORER_FORMS = '"world", "clip:PATH", "dino:PATH", or a pair like "dino:PATH,clip:PATH"'
IDENTIFIER = SUBJECT_TOKEN.split()[0]
"""The rare word that names the subject ("sks"); CLIP-T drops it, CLIP never learned it."""


class MetricsError(ValueError):
    """A measurement was asked for with bad inputs (no prompts, bad probe values, ...)."""


class ScorerError(ValueError):
    """A scorer could not be built: unknown spec, or weights missing, unreadable or of the wrong kind."""


class Scorer(Protocol):
    """Compares samples with references and with prompts; every score is in ``[0, 1]``."""

    name: str

    def subject_similarity(
        self, images: Sequence[Image.Image], references: Sequence[Image.Image]
    ) -> list[float]:
        """Per image: how much it shows the subject of ``references``."""
        ...

    def prompt_agreement(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float] | None:
        """Per image: how well it obeys its prompt; ``None`` when the scorer cannot read text."""
        ...


def _check_pairs(images: Sequence[Image.Image], prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise MetricsError(f"{len(images)} images for {len(prompts)} prompts: give one prompt per image")


# --- the world scorer ----------------------------------------------------------------------------


COLOUR_SCALE = 150.0
"""RGB distance at which :meth:`WorldScorer.subject_similarity` gives a colour no credit: just beyond
the nearest solid named colour to the subject's stripes (purple, 146), short of the distance between
two named colours that differ in a clear way (red to orange, 106, still earns 0.29)."""


def _subject_tones(colour_sets: Sequence[Sequence[tuple[int, int, int]]]) -> list[tuple[float, ...]]:
    """The subject's colours: per tone, the median over the references (each aligned to the first)."""
    aligned = [aligned_tones(colours, colour_sets[0]) for colours in colour_sets]
    return [tuple(tone) for tone in np.median(np.stack(aligned), axis=0)]


class WorldScorer:
    """The embedded world's scorer: exact readings of colour, shape, size and background, no weights."""

    name = "world"

    def subject_similarity(
        self, images: Sequence[Image.Image], references: Sequence[Image.Image]
    ) -> list[float]:
        """How much each image looks like the references' subject, in ``[0, 1]``, graded as DINO's cosine is.

        The subject is the references' majority reading (colour, shape); its colours are those
        references' colours (:attr:`~boft_diffusion.world.Reading.colours`, one or two tones each,
        matched tone to tone and averaged). An image scores the mean of

        - colour: ``1 - d / COLOUR_SCALE`` (at least 0), ``d`` the :func:`~boft_diffusion.world.colour_distance`
          of its object's colours to the subject's: 1 for the same colours, about 0 for any solid named
          colour against the subject's pink and teal (its nearest, purple, is 146 away), partial credit
          for the right two tones drawn muted or blurred;
        - shape: 1 when it reads as the subject's shape, else 0.

        An image with no object scores 0. Exact renders of the subject score 1.0, a red star 0.5.
        """
        if not references:
            raise MetricsError("no reference images to compare with")
        readings = [score_image(image) for image in references]
        subject = Counter((r.colour, r.shape) for r in readings).most_common(1)[0][0]  # ties: first seen
        if None in subject:
            raise MetricsError("the world scorer finds no object in most reference images")
        tones = _subject_tones([r.colours for r in readings if (r.colour, r.shape) == subject])
        scores = []
        for reading in map(score_image, images):
            if not reading.colours:
                scores.append(0.0)
                continue
            colour = max(0.0, 1.0 - colour_distance(reading.colours, tones) / COLOUR_SCALE)
            scores.append((colour + (reading.shape == subject[1])) / 2)
        return scores

    def prompt_agreement(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """The share of the attributes each prompt states (``parse_caption``) that its image reads back.

        Whether the image shows *the* subject is :meth:`subject_similarity`'s question, not this one.
        """
        _check_pairs(images, prompts)
        scores = []
        for image, prompt in zip(images, prompts):
            stated = {k: v for k, v in parse_caption(prompt).items() if k in ATTRIBUTES}
            if not stated:
                raise MetricsError(
                    f"prompt {prompt!r} states no attribute of the world the scorer can check "
                    f"({', '.join(ATTRIBUTES)})"
                )
            reading = score_image(image)
            scores.append(sum(getattr(reading, k) == v for k, v in stated.items()) / len(stated))
        return scores


# --- embedding scorers (CLIP, DINO) ----------------------------------------------------------------

EMBEDDING_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "clip": ("clip",),
    "dino": ("dinov2", "dinov2_with_registers", "dinov3_vit", "vit"),
}
"""The ``model_type`` values in ``config.json`` each embedding scorer accepts."""


def _checked_folder(path: str | Path, kind: str) -> Path:
    """``path`` as a folder holding a ``kind`` model's ``config.json``, or a :class:`ScorerError` saying why not."""
    folder = Path(path).expanduser()
    expected = f"a local folder with a {kind} model saved by transformers (config.json and weights)"
    if not folder.exists():
        raise ScorerError(f"{kind} scorer: {folder} does not exist; expected {expected}")
    if not folder.is_dir():
        raise ScorerError(f"{kind} scorer: {folder} is a file, not a folder; expected {expected}")
    config = folder / "config.json"
    if not config.is_file():
        raise ScorerError(f"{kind} scorer: {folder} has no config.json; expected {expected}")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise ScorerError(f"{kind} scorer: {config} is not a readable JSON config: {error}") from None
    if model_type not in EMBEDDING_MODEL_TYPES[kind]:
        raise ScorerError(
            f"{kind} scorer: {folder} holds a {model_type!r} model, not a {kind} model "
            f"(expected model_type {' or '.join(map(repr, EMBEDDING_MODEL_TYPES[kind]))})"
        )
    return folder


def _pooled(output: Any) -> torch.Tensor:
    """CLIP's projected features: a tensor (transformers 4) or an output's ``pooler_output`` (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class EmbeddingScorer:
    """CLIP (CLIP-I and CLIP-T) or DINO from a local folder, through transformers; never downloads.

    Embeddings are L2-normalised, so a score is a cosine, clipped to ``[0, 1]``:

        clip  image: ``get_image_features``; text: ``get_text_features`` of the prompt without "sks"
        dino  image: the CLS token, ``last_hidden_state[:, 0]``; no text (``prompt_agreement`` is None)
    """

    def __init__(self, path: str | Path, kind: Literal["clip", "dino"], device: str = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

        if kind not in EMBEDDING_MODEL_TYPES:
            raise ScorerError(f"unknown embedding scorer kind {kind!r}; expected 'clip' or 'dino'")
        self.path = _checked_folder(path, kind)
        self.name, self.kind, self.device = kind, kind, torch.device(device)
        try:
            model_class = CLIPModel if kind == "clip" else AutoModel
            self.model = model_class.from_pretrained(self.path, local_files_only=True).to(self.device).eval()
            self.processor = AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
            self.tokenizer = (
                AutoTokenizer.from_pretrained(self.path, local_files_only=True) if kind == "clip" else None
            )
        except Exception as error:  # transformers raises OSError, ValueError, RuntimeError, ... by case
            raise ScorerError(f"{kind} scorer: could not load the model in {self.path}: {error}") from error

    @torch.no_grad()
    def _image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-norm ``(N, D)`` embeddings of ``images``."""
        chunks = []
        for start in range(0, len(images), EMBED_BATCH):
            batch = [image.convert("RGB") for image in images[start : start + EMBED_BATCH]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            if self.kind == "clip":
                chunks.append(_pooled(self.model.get_image_features(pixel_values=pixels)))
            else:
                chunks.append(self.model(pixel_values=pixels).last_hidden_state[:, 0])
        return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)

    @torch.no_grad()
    def _text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm ``(N, D)`` CLIP text embeddings of ``prompts``, the identifier word removed."""
        texts = [" ".join(re.sub(rf"\b{IDENTIFIER}\b", " ", p).split()) for p in prompts]
        chunks = []
        for start in range(0, len(texts), EMBED_BATCH):
            tokens = self.tokenizer(
                texts[start : start + EMBED_BATCH], padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            chunks.append(_pooled(self.model.get_text_features(**tokens)))
        return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)

    def subject_similarity(
        self, images: Sequence[Image.Image], references: Sequence[Image.Image]
    ) -> list[float]:
        """Per image, its mean cosine to the references' embeddings (DINO / CLIP-I), clipped to [0, 1]."""
        if not references:
            raise MetricsError("no reference images to compare with")
        if not images:
            return []
        cosine = self._image_embeddings(images) @ self._image_embeddings(references).T  # (N, R)
        return cosine.mean(1).clamp(0.0, 1.0).tolist()

    def prompt_agreement(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float] | None:
        """Per image, the cosine of its CLIP embedding and its prompt's (CLIP-T); ``None`` for DINO."""
        _check_pairs(images, prompts)
        if self.kind != "clip":
            return None
        if not images:
            return []
        cosine = (self._image_embeddings(images) * self._text_embeddings(prompts)).sum(-1)
        return cosine.clamp(0.0, 1.0).tolist()


class CombinedScorer:
    """Subject similarity from one scorer, prompt agreement from another (``"dino+clip"``)."""

    def __init__(self, subject: Scorer, prompts: Scorer) -> None:
        self.subject, self.prompts = subject, prompts
        self.name = f"{subject.name}+{prompts.name}"

    def subject_similarity(
        self, images: Sequence[Image.Image], references: Sequence[Image.Image]
    ) -> list[float]:
        return self.subject.subject_similarity(images, references)

    def prompt_agreement(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float] | None:
        return self.prompts.prompt_agreement(images, prompts)


def _parse_scorer_part(part: str, spec: str) -> tuple[str, str | None]:
    """``"world"`` -> ("world", None); ``"clip:PATH"`` -> ("clip", PATH); anything else is an error."""
    kind, _, path = part.strip().partition(":")
    if kind == "world" and not path:
        return "world", None
    if kind in EMBEDDING_MODEL_TYPES and path.strip():
        return kind, path.strip()
    raise ScorerError(f"unknown scorer {spec!r}; expected {SCORER_FORMS}")


def load_scorer(spec: str, device: str = "cpu") -> Scorer:
    """A scorer from its spec: ``"world"``, ``"clip:PATH"``, ``"dino:PATH"`` or a pair of them.

    In a pair (``"dino:PATH,clip:PATH"``) the first scores the subject and the second, which must read
    text (clip or world), scores the prompts.
    """
    parts = [_parse_scorer_part(part, spec) for part in spec.split(",")]
    if len(parts) > 2:
        raise ScorerError(f"scorer {spec!r} names {len(parts)} scorers; expected {SCORER_FORMS}")
    if len(parts) == 2 and parts[1][0] == "dino":
        raise ScorerError(
            f"scorer {spec!r}: the second of a pair scores prompts and must read text (clip or world), "
            "which dino cannot"
        )
    scorers = [WorldScorer() if path is None else EmbeddingScorer(path, kind, device) for kind, path in parts]
    return scorers[0] if len(scorers) == 1 else CombinedScorer(*scorers)


# --- sampling ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DreamBoothProbe:
    """The prompts and sampling settings of a DreamBooth measurement (see :func:`measure_dreambooth`)."""

    instance_prompt: str
    class_prompt: str
    context_prompts: tuple[str, ...]
    """Prompts putting the subject in a context (what CLIP-T / prompt fidelity is measured on)."""
    num_images: int = 4
    """Images per prompt."""
    seed: int = 0
    num_inference_steps: int = EVAL_STEPS
    guidance_scale: float = EVAL_GUIDANCE

    def __post_init__(self) -> None:
        if isinstance(self.context_prompts, str):
            raise MetricsError("context_prompts must be a sequence of prompts, not one string")
        object.__setattr__(self, "context_prompts", tuple(self.context_prompts))
        for name in ("instance_prompt", "class_prompt"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise MetricsError(f"{name} must be a non-empty prompt, got {getattr(self, name)!r}")
        if not self.context_prompts:
            raise MetricsError(
                "context_prompts is empty: give at least one prompt putting the subject in a context"
            )
        blank = [i for i, p in enumerate(self.context_prompts) if not isinstance(p, str) or not p.strip()]
        if blank:
            raise MetricsError(f"context_prompts {blank} are blank: every context prompt must say something")
        for name in ("num_images", "num_inference_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MetricsError(f"{name} must be an integer >= 1, got {value!r}")
        g = self.guidance_scale
        if not isinstance(g, int | float) or not math.isfinite(g) or not (g >= 1 or g == 0):
            raise MetricsError(f"guidance_scale must be finite and >= 1 (0 or 1: no guidance), got {g!r}")


WORLD_CONTEXTS: tuple[tuple[str, str], ...] = (
    ("plain", "orange"),
    ("striped", "green"),
    ("checkered", "blue"),
    ("speckled", "purple"),
)
"""(texture, background colour) of the default probe's context prompts: every texture once."""


def world_dreambooth_probe(**overrides: Any) -> DreamBoothProbe:
    """The embedded default probe: the tiny recipe's instance / class prompts and the subject on four
    backgrounds, one per texture (``"a photo of sks toy on a striped green background"``).

    ``overrides`` replace fields of :class:`DreamBoothProbe` (``num_images=2``, ``seed=1``, ...).
    """
    contexts = tuple(
        caption_of(Scene("star", SUBJECT_COLOUR, "large", background, texture))
        for texture, background in WORLD_CONTEXTS
    )
    settings = dict(
        instance_prompt=TINY_INSTANCE_PROMPT, class_prompt=TINY_CLASS_PROMPT, context_prompts=contexts
    )
    unknown = sorted(set(overrides) - {f.name for f in fields(DreamBoothProbe)})
    if unknown:
        names = ", ".join(f.name for f in fields(DreamBoothProbe))
        raise MetricsError(f"unknown probe field(s) {', '.join(unknown)}; expected some of {names}")
    return DreamBoothProbe(**{**settings, **overrides})


def sample_images(
    pipe: Any,
    prompts: Sequence[str],
    num_images: int,
    *,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 32,
) -> list[list[Image.Image]]:
    """``num_images`` PIL images per prompt, ``[per prompt [images]]``.

    Image ``i`` of every prompt starts from ``torch.Generator("cpu").manual_seed(seed + i)``, one
    generator per image, so it is the same however the calls are batched (up to float rounding of
    batched kernels) and however many images are asked for. The pipeline is called with chunks of
    at most ``batch_size`` images and left as it was.
    """
    if isinstance(prompts, str) or not prompts:
        raise MetricsError("give a non-empty list of prompts to sample")
    blank = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if blank:
        raise MetricsError(f"prompts {blank} are blank: every prompt to sample must say something")
    for name, value in (("num_images", num_images), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise MetricsError(f"{name} must be an integer >= 1, got {value!r}")
    jobs = [(prompt, i) for prompt in prompts for i in range(num_images)]
    images: list[Image.Image] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        images += pipe(
            prompt=[prompt for prompt, _ in chunk],
            generator=[torch.Generator("cpu").manual_seed(seed + i) for _, i in chunk],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            output_type="pil",
        ).images
    return [images[k * num_images : (k + 1) * num_images] for k in range(len(prompts))]


# --- measurements -----------------------------------------------------------------------------------


@dataclass
class Measurement:
    """``metrics``: ``subject_fidelity``, ``prompt_fidelity`` (None without a text scorer), ``class_drift``;
    ``samples``: each prompt's images, for grids."""

    metrics: dict[str, float | None]
    samples: dict[str, list[Image.Image]]


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def measure_dreambooth(
    pipe: Any, probe: DreamBoothProbe, instance_images: Sequence[Image.Image], scorer: Scorer
) -> Measurement:
    """Sample the probe's instance, class and context prompts (one :func:`sample_images` call) and score:

    subject_fidelity = mean subject_similarity(instance samples, instance_images)    (DINO / CLIP-I)
    prompt_fidelity  = mean prompt_agreement(context samples, their prompts)          (CLIP-T)
    class_drift      = mean subject_similarity(class samples, instance_images)       (PRES)
    """
    if not instance_images:
        raise MetricsError("no instance images: subject fidelity compares samples with the subject's images")
    prompts = list(dict.fromkeys([probe.instance_prompt, probe.class_prompt, *probe.context_prompts]))
    sampled = sample_images(
        pipe,
        prompts,
        probe.num_images,
        seed=probe.seed,
        num_inference_steps=probe.num_inference_steps,
        guidance_scale=probe.guidance_scale,
    )
    samples = dict(zip(prompts, sampled))
    context_images = [image for p in probe.context_prompts for image in samples[p]]
    context_prompts = [p for p in probe.context_prompts for _ in samples[p]]
    agreement = scorer.prompt_agreement(context_images, context_prompts)
    metrics = {
        "subject_fidelity": _mean(scorer.subject_similarity(samples[probe.instance_prompt], instance_images)),
        "prompt_fidelity": None if agreement is None else _mean(agreement),
        "class_drift": _mean(scorer.subject_similarity(samples[probe.class_prompt], instance_images)),
    }
    return Measurement(metrics=metrics, samples=samples)


def world_prompt_accuracy(
    pipe: Any,
    num_prompts: int = 64,
    *,
    held_out: bool = False,
    seed: int = 0,
    num_inference_steps: int = EVAL_STEPS,
    guidance_scale: float = EVAL_GUIDANCE,
) -> dict[str, float]:
    """How often the world scorer reads the pipeline's samples back as their prompts asked, per attribute.

    Prompts are the full captions of ``sample_scenes(num_prompts, seed)`` (``held_out=True``: of
    ``held_out_scenes``, pairs pretraining never saw), one image each; keys are ``world.ATTRIBUTES``.
    """
    if not isinstance(num_prompts, int) or num_prompts < 1:
        raise MetricsError(f"num_prompts must be an integer >= 1, got {num_prompts!r}")
    scenes = (held_out_scenes if held_out else sample_scenes)(num_prompts, seed)
    sampled = sample_images(
        pipe,
        [scene.caption for scene in scenes],
        1,
        seed=seed,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
    )
    return attribute_accuracy([score_image(images[0]) for images in sampled], scenes)


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


def format_metrics(
    before: dict[str, float | None] | None, after: dict[str, float | None], scorer: str
) -> str:
    """The metrics as a small table: metric, before, after (``-`` where not measured)."""

    def cell(value: float | None) -> str:
        return "    -  " if value is None else f"{value:7.3f}"

    lines = [f"What it taught (scorer: {scorer}):", f"  {'metric':<18} {'before':>7} {'after':>7}"]
    lines += [f"  {name:<18} {cell((before or {}).get(name))} {cell(v)}" for name, v in after.items()]
    return "\n".join(lines)
