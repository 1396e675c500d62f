"""What a recipe taught, measured as the papers measure it.

DreamBooth (Ruiz et al., CVPR 2023) scores a finetuned model by sampling prompts and comparing:

    subject_fidelity  samples of the instance prompt ("a photo of sks toy") and of every context prompt
                      against the instance images: the paper's DINO and CLIP-I, the mean cosine of
                      image embeddings over all prompts' samples (each prompt's own in ``per_prompt``)
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

Controllable generation (OFT and BOFT's Canny-to-image and segmentation-to-image tasks) is scored by
control fidelity: sample each held-out condition with its prompt, detect the control signal again on the
sample with a :class:`ControlDetector`, and compare it with the condition's ground truth:

    control_edge_f1   edge_f1(detected edges, target edges), 1 px tolerance (the papers' Canny F1)
    control_mask_iou  mask_iou(detected mask, target mask) (the papers' segmentation IoU)

:func:`world_control_cases` gives held-out world scenes with the renderer's exact maps and
:class:`WorldControlDetector` reads both maps back; for a user's data, :func:`cases_from_conditions`
binarises the conditioning images and :class:`EdgeDetector` (Canny's gradient and thinning, in numpy)
finds the edges of generated images.

Sampling is deterministic: image ``i`` of every prompt starts from its own generator seeded
``seed + i``, so it does not depend on batching or on how many images are asked for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image, ImageFilter

from .sampling import image_seeds, seeded_images
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
    condition_image,
    edge_f1,
    held_out_scenes,
    mask_iou,
    parse_caption,
    render,
    sample_scenes,
    score_image,
)

__all__ = [
    "CONTROL_DETECTORS",
    "CONTROL_MAPS",
    "CONTROL_METRICS",
    "CONTROL_SEED",
    "EVAL_GUIDANCE",
    "EVAL_STEPS",
    "CombinedScorer",
    "ControlCase",
    "ControlDetector",
    "ControlProbe",
    "ControlSampler",
    "DreamBoothProbe",
    "EdgeDetector",
    "EmbeddingScorer",
    "Measurement",
    "MetricsError",
    "Scorer",
    "ScorerError",
    "WorldControlDetector",
    "WorldScorer",
    "before_after_control_rows",
    "before_after_rows",
    "cases_from_conditions",
    "format_metrics",
    "grid",
    "load_control_detector",
    "load_scorer",
    "measure_control",
    "measure_dreambooth",
    "reconstruction_fidelity",
    "sample_images",
    "world_control_cases",
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

    Image ``i`` of every prompt starts from seed ``seed + i`` (:func:`~boft_diffusion.sampling.seeded_images`:
    one CPU generator per image), so it is the same however the calls are batched (up to float rounding
    of batched kernels) and however many images are asked for. The pipeline is called with chunks of
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
    images = seeded_images(
        pipe,
        [prompt for prompt in prompts for _ in range(num_images)],
        image_seeds(seed, num_images) * len(prompts),
        batch_size=batch_size,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        output_type="pil",
    )
    return [images[k * num_images : (k + 1) * num_images] for k in range(len(prompts))]


# --- measurements -----------------------------------------------------------------------------------


@dataclass
class Measurement:
    """``metrics``: ``subject_fidelity``, ``prompt_fidelity`` (None without a text scorer), ``class_drift``
    (:func:`measure_dreambooth`) or ``control_edge_f1``, ``control_mask_iou`` (:func:`measure_control`);
    ``samples``: each prompt's images (a control case's condition first), for grids; ``per_prompt``:
    each prompt's own values of the metrics it takes part in, ``{prompt: {metric: value}}`` (empty
    where a measurement has none)."""

    metrics: dict[str, float | None]
    samples: dict[str, list[Image.Image]]
    per_prompt: dict[str, dict[str, float | None]] = dataclasses.field(default_factory=dict)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def measure_dreambooth(
    pipe: Any, probe: DreamBoothProbe, instance_images: Sequence[Image.Image], scorer: Scorer
) -> Measurement:
    """Sample the probe's instance, context and class prompts (one :func:`sample_images` call) and score
    them as the DreamBooth paper does (its DINO / CLIP-I average over every prompt's samples):

    subject_fidelity = mean subject_similarity(instance and context samples, instance_images)  (DINO / CLIP-I)
    prompt_fidelity  = mean prompt_agreement(context samples, their prompts)                    (CLIP-T)
    class_drift      = mean subject_similarity(class samples, instance_images)                 (PRES)

    Every prompt has ``probe.num_images`` samples, so subject fidelity is also the mean of the
    prompts' own values; ``per_prompt`` holds those (``subject_fidelity`` of the instance and each
    context prompt, their ``prompt_fidelity`` for the contexts, ``class_drift`` of the class prompt).
    """
    if not instance_images:
        raise MetricsError("no instance images: subject fidelity compares samples with the subject's images")
    contexts = list(dict.fromkeys(probe.context_prompts))
    subject_prompts = list(dict.fromkeys([probe.instance_prompt, *contexts]))
    prompts = list(dict.fromkeys([probe.instance_prompt, probe.class_prompt, *contexts]))
    n = probe.num_images
    sampled = sample_images(
        pipe, prompts, n, seed=probe.seed, num_inference_steps=probe.num_inference_steps,
        guidance_scale=probe.guidance_scale,
    )  # fmt: skip
    samples = dict(zip(prompts, sampled))
    every = [image for images in sampled for image in images]
    likeness = _by_prompt(scorer.subject_similarity(every, instance_images), prompts, n)
    agreement = scorer.prompt_agreement(
        [image for p in contexts for image in samples[p]], [p for p in contexts for _ in range(n)]
    )
    obeyed = _by_prompt(agreement, contexts, n) if agreement is not None else None
    per_prompt: dict[str, dict[str, float | None]] = {
        p: {"subject_fidelity": _mean(likeness[p])} for p in subject_prompts
    }
    for p in contexts:
        per_prompt[p]["prompt_fidelity"] = None if obeyed is None else _mean(obeyed[p])
    per_prompt.setdefault(probe.class_prompt, {})["class_drift"] = _mean(likeness[probe.class_prompt])
    metrics = {
        "subject_fidelity": _mean([value for p in subject_prompts for value in likeness[p]]),
        "prompt_fidelity": None if agreement is None else _mean(agreement),
        "class_drift": _mean(likeness[probe.class_prompt]),
    }
    return Measurement(metrics=metrics, samples=samples, per_prompt=per_prompt)


def _by_prompt(values: Sequence[float], prompts: Sequence[str], n: int) -> dict[str, list[float]]:
    """``values`` of ``n`` images per prompt, in the prompts' order, as ``{prompt: its n values}``."""
    return {p: list(values[k * n : (k + 1) * n]) for k, p in enumerate(prompts)}


@torch.no_grad()
def reconstruction_fidelity(
    vae: Any, images: Sequence[Image.Image], scorer: Scorer | None = None
) -> list[float]:
    """Per image, ``subject_similarity(VAE(image), images)``: the ceiling of subject fidelity on a model.

    Every sample leaves the model through its VAE's decoder, so a view whose own reconstruction (the
    posterior mean, decoded) scores ``c`` cannot be matched better than about ``c``. ``images`` are the
    subject's (RGB, one size); the scorer defaults to the world's.
    """
    if not images:
        raise MetricsError("no images to reconstruct")
    scorer = scorer or WorldScorer()
    pixels = np.stack([np.asarray(image.convert("RGB")) for image in images])
    parameter = next(vae.parameters())
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(parameter.device, parameter.dtype) / 127.5 - 1
    decoded = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
    recon = ((decoded + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return scorer.subject_similarity([Image.fromarray(p) for p in recon], images)


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
