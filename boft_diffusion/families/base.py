"""The protocol every model family implements (see :mod:`boft_diffusion.families`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Family", "UnsupportedFamilyError", "component"]


class UnsupportedFamilyError(ValueError):
    """A pipeline, name or adapter of a model family this package does not support (or another one)."""


def component(pipe: Any, name: str) -> Any:
    """``pipe.<name>`` for a pipeline, ``pipe[name]`` for a mapping; ``None`` when absent."""
    return pipe.get(name) if isinstance(pipe, Mapping) else getattr(pipe, name, None)


@dataclass(frozen=True)
class Family:
    """How one kind of text-to-image pipeline works, as far as training and adapters need to know.

    The base implements the shared shape (a denoiser called as ``denoiser(latents, t, states, ...)``,
    CLIP-style tokenizers padded to their ``model_max_length``); a family overrides what differs.
    """

    name: str
    """Short name stored in adapter files (``sd``, ``sdxl``, ...)."""
    title: str
    """Human name (``Stable Diffusion 1.x/2.x``)."""
    pipeline_classes: tuple[str, ...]
    """The stock diffusers pipeline classes of this family; the first samples and validates."""
    denoiser: str
    """The denoiser's component name (``unet`` or ``transformer``)."""
    text_encoders: tuple[str, ...]
    """Text-encoder component names, each with the tokenizer of the same suffix."""
    default_targets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Default BOFT target-module suffixes per component."""
    objective: str = "ddpm"
    """What the denoiser is trained on: ``ddpm`` (noise schedule; epsilon or v) or ``flow`` (flow matching)."""

    # --- what a pipeline is ---------------------------------------------------------------------
    def matches(self, pipe: Any) -> bool:
        """Whether ``pipe`` (a pipeline or a component mapping) is of this family."""
        if type(pipe).__name__ in self.pipeline_classes:
            return True
        return component(pipe, self.denoiser) is not None and all(
            component(pipe, name) is not None for name in self.text_encoders
        )

    @property
    def components(self) -> tuple[str, ...]:
        """The trainable components, denoiser first."""
        return (self.denoiser, *self.text_encoders)

    def tokenizers(self, pipe: Any) -> list[Any]:
        """The tokenizer of each text encoder, in order."""
        return [component(pipe, name.replace("text_encoder", "tokenizer")) for name in self.text_encoders]

    def pipeline_class(self) -> type:
        """The stock pipeline class that samples from this family."""
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    # --- prompts --------------------------------------------------------------------------------
    def tokenize(self, pipe: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids ``{"input_ids": (B, L), "input_ids_2": ...}``, one entry per text encoder, each
        padded to its tokenizer's ``model_max_length`` and truncated."""
        ids = {}
        for i, tokenizer in enumerate(self.tokenizers(pipe)):
            ids["input_ids" if i == 0 else f"input_ids_{i + 1}"] = tokenizer(
                list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids  # fmt: skip
        return ids

    def encode_prompt(
        self, encoders: Mapping[str, nn.Module], batch: Mapping[str, Any], device: Any
    ) -> dict[str, Any]:
        """The denoiser's conditioning from token ids (``batch`` holds :meth:`tokenize`'s keys and may hold
        per-sample ``original_sizes`` / ``crop_top_lefts``): keyword arguments for :meth:`denoise`.
        ``encoders`` maps each text-encoder name to the module to call (the trained, prepared one)."""
        raise NotImplementedError

    # --- the denoiser ---------------------------------------------------------------------------
    def denoise(
        self,
        denoiser: nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: Mapping[str, Any],
    ) -> torch.Tensor:
        """The denoiser's prediction for ``noisy`` latents at ``timesteps`` under ``conditioning``."""
        states = conditioning["encoder_hidden_states"]
        extra = {k: v for k, v in conditioning.items() if k != "encoder_hidden_states"}
        return denoiser(noisy, timesteps, states, return_dict=False, **extra)[0]
