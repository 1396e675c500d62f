"""Scorers: how much a sample looks like the subject and obeys its prompt (the world's exact scorer,
CLIP and DINO from local folders), and the evaluation's sampler settings."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image

from ..world import (
    ATTRIBUTES,
    SUBJECT_TOKEN,
    aligned_tones,
    colour_distance,
    parse_caption,
    score_image,
)

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
