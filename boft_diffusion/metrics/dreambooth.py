"""DreamBooth's measurements: the probe (instance, class and context prompts), seeded samples of it,
subject fidelity, prompt fidelity and class drift, the VAE's ceiling and world attribute accuracy."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..sampling import image_seeds, seeded_images
from ..tiny import TINY_CLASS_PROMPT, TINY_INSTANCE_PROMPT
from ..world import (
    SUBJECT_COLOUR,
    Scene,
    attribute_accuracy,
    caption_of,
    held_out_scenes,
    sample_scenes,
    score_image,
)
from .scorers import EVAL_GUIDANCE, EVAL_STEPS, MetricsError, Scorer, WorldScorer

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
    pipe: Any,
    probe: DreamBoothProbe,
    instance_images: Sequence[Image.Image],
    scorer: Scorer,
    subjects: Mapping[str, Sequence[Image.Image]] | None = None,
) -> Measurement:
    """Sample the probe's instance, context and class prompts (one :func:`sample_images` call) and score
    them as the DreamBooth paper does (its DINO / CLIP-I average over every prompt's samples):

    subject_fidelity = mean subject_similarity(instance and context samples, instance_images)  (DINO / CLIP-I)
    prompt_fidelity  = mean prompt_agreement(context samples, their prompts)                    (CLIP-T)
    class_drift      = mean subject_similarity(class samples, instance_images)                 (PRES)

    Every prompt has ``probe.num_images`` samples, so subject fidelity is also the mean of the
    prompts' own values; ``per_prompt`` holds those (``subject_fidelity`` of the instance and each
    context prompt, their ``prompt_fidelity`` for the contexts, ``class_drift`` of the class prompt).

    ``subjects`` (further subjects of the run: ``{instance prompt: its images}``) are sampled too, each
    scored against its own images into ``per_prompt`` only (``subject_fidelity``); a prompt the probe
    samples already keeps the probe's values.
    """
    if not instance_images:
        raise MetricsError("no instance images: subject fidelity compares samples with the subject's images")
    contexts = list(dict.fromkeys(probe.context_prompts))
    subject_prompts = list(dict.fromkeys([probe.instance_prompt, *contexts]))
    prompts = list(dict.fromkeys([probe.instance_prompt, probe.class_prompt, *contexts]))
    others = {p: images for p, images in (subjects or {}).items() if p not in prompts}
    if not all(others.values()):
        raise MetricsError(f"no images of the subject of {next(p for p, i in others.items() if not i)!r}")
    n = probe.num_images
    sampled = sample_images(
        pipe, [*prompts, *others], n, seed=probe.seed, num_inference_steps=probe.num_inference_steps,
        guidance_scale=probe.guidance_scale,
    )  # fmt: skip
    samples = dict(zip([*prompts, *others], sampled))
    every = [image for p in prompts for image in samples[p]]
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
    for p, images in others.items():
        per_prompt[p] = {"subject_fidelity": _mean(scorer.subject_similarity(samples[p], images))}
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
