"""The protocol every model family implements (see :mod:`boft_diffusion.families`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Family", "SingleFileLayout", "UnsupportedFamilyError", "component"]


class UnsupportedFamilyError(ValueError):
    """A pipeline, name or adapter of a model family this package does not support (or another one)."""


def component(pipe: Any, name: str) -> Any:
    """``pipe.<name>`` for a pipeline, ``pipe[name]`` for a mapping; ``None`` when absent."""
    return pipe.get(name) if isinstance(pipe, Mapping) else getattr(pipe, name, None)


@dataclass(frozen=True)
class SingleFileLayout:
    """How a family's pipeline becomes one ``.safetensors`` state dict in the model's original (pre-diffusers)
    key layout, the single file ComfyUI, AUTOMATIC1111 and diffusers' ``from_single_file`` read. Pure key
    bookkeeping (:mod:`boft_diffusion.families.keys`); merging and writing are :mod:`boft_diffusion.export`'s."""

    components: tuple[str, ...]
    """Exactly the components a pipeline must have to be written (``vae`` included)."""
    to_original: Callable[
        [Mapping[str, Mapping[str, torch.Tensor]], Mapping[str, Any]], dict[str, torch.Tensor]
    ]
    """``({component: state dict}, {component: config})`` of the :attr:`held` components -> ``{original key:
    tensor}``; a key with no place in the layout is a ``ValueError`` naming it."""
    holds: tuple[str, ...] | None = None
    """What the file holds when that is less than :attr:`components` (FLUX.1: the transformer only; the others
    must be there, unadapted)."""

    @property
    def held(self) -> tuple[str, ...]:
        """The components whose weights the file holds."""
        return self.components if self.holds is None else self.holds


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
    denoiser_classes: tuple[str, ...]
    """The denoiser's diffusers class names."""
    text_encoders: tuple[str, ...]
    """Text-encoder component names, each with the tokenizer of the same suffix."""
    tiny_builder: str
    """The function of :mod:`boft_diffusion.tiny` that builds this family's embedded tiny pipeline offline
    (:meth:`tiny_pipeline`; ``build_tiny_sdxl_pipeline``, ...): what tests, ``model.tiny_family`` and model
    cards use."""
    default_targets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Default BOFT target-module suffixes per component."""
    objective: str = "ddpm"
    """What the denoiser is trained on: ``ddpm`` (noise schedule; epsilon or v) or ``flow`` (flow matching)."""
    trainable_text_encoders: tuple[str, ...] | None = None
    """The text encoders ``boft.train_text_encoder`` adapts (``None``: all; SD3 and Flux leave T5 frozen, as
    diffusers' DreamBooth scripts do)."""
    max_sequence_length: int | None = None
    """Token length for T5 encoders (diffusers' DreamBooth default for the family), capped by the tokenizer's."""
    per_batch_conditioning: tuple[str, ...] = ()
    """Conditioning keys (nested keys joined by dots) that depend on the batch's images, not its prompts
    (SDXL's ``added_cond_kwargs.time_ids``): never cached, made by :meth:`add_batch_conditioning`."""
    tiny_weights: tuple[str, ...] = ("random",)
    """The weights its tiny pipeline can be built with, the default first: ``world`` (pretrained on the
    procedural world, shipped in the package) and ``random`` (initialised from a seed)."""
    call_arguments: tuple[str, ...] = ("negative_prompt",)
    """The optional sampling arguments (:data:`boft_diffusion.sampling.OPTIONAL_ARGUMENTS`) that its stock
    pipelines' ``__call__`` takes (FLUX.2 [klein] takes no ``negative_prompt``); callers of
    :func:`~boft_diffusion.sampling.seeded_images` pass them as ``accepted``."""
    pipeline_options: Mapping[str, Any] = field(default_factory=dict)
    """Constructor arguments beyond the components for a stock pipeline of this family built from another
    pipeline's modules (SD: no safety checker; SDXL: no watermark)."""
    controlnet_pipeline: str | None = None
    """The stock diffusers pipeline class that samples this family's denoiser with a ``ControlNetModel`` (the
    UNet ControlNet the controlnet recipe trains); ``None``: none (diffusers' SD3 / Flux ControlNet pipelines
    take other model classes, which this package neither trains nor loads)."""
    single_file: SingleFileLayout | None = None
    """Its original single-file layout (``export_merged(..., format="single_file")``); ``None``: none written."""

    # --- what a pipeline is ---------------------------------------------------------------------
    def matches(self, pipe: Any) -> bool:
        """Whether ``pipe`` (a pipeline, or a component mapping) is of this family: its class is one of the
        family's pipeline classes, or its denoiser is of the family's class and every text encoder is there."""
        if type(pipe).__name__ in self.pipeline_classes:
            return True
        denoiser = component(pipe, self.denoiser)
        return (
            type(denoiser).__name__ in self.denoiser_classes
            and self.denoiser_fits(denoiser)
            and all(component(pipe, name) is not None for name in self.text_encoders)
        )

    def denoiser_fits(self, denoiser: nn.Module) -> bool:
        """A finer check of the denoiser's config (SDXL's UNet has text-time conditioning, SD's has not)."""
        return True

    @property
    def components(self) -> tuple[str, ...]:
        """The adaptable components, denoiser first."""
        return (self.denoiser, *self.text_encoders)

    @property
    def trained_text_encoders(self) -> tuple[str, ...]:
        """The text encoders text-encoder training adapts."""
        return self.text_encoders if self.trainable_text_encoders is None else self.trainable_text_encoders

    def token_key(self, encoder: str) -> str:
        """The batch key of ``encoder``'s token ids (``input_ids``, ``input_ids_2``, ...)."""
        return "input_ids" + encoder.removeprefix("text_encoder")

    def tokenizers(self, pipe: Any) -> dict[str, Any]:
        """The tokenizer of each text encoder by component name (``tokenizer``, ``tokenizer_2``, ...), in order:
        what :meth:`tokenize` needs, and all a data loader's workers need of the pipeline."""
        names = (name.replace("text_encoder", "tokenizer") for name in self.text_encoders)
        return {name: component(pipe, name) for name in names}

    def pipeline_class(self) -> type:
        """The stock pipeline class that samples from this family."""
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    def controlnet_pipeline_class(self) -> type | None:
        """The stock class :attr:`controlnet_pipeline` names (``None`` where there is none)."""
        import diffusers

        return None if self.controlnet_pipeline is None else getattr(diffusers, self.controlnet_pipeline)

    def tiny_pipeline(
        self, seed: int = 0, *, weights: str | None = None, prediction_type: str | None = None
    ) -> Any:
        """The family's embedded tiny pipeline, built offline from ``seed`` by :attr:`tiny_builder`, with
        ``weights`` (one of :attr:`tiny_weights`; ``None``: the family's default, the first) and, when given,
        the scheduler's ``prediction_type``. A weight the family has not is a ``ValueError`` naming those it has.
        """
        from .. import tiny

        self._check_tiny_weights(weights)
        pipe = getattr(tiny, self.tiny_builder)(seed)
        if prediction_type is not None:
            pipe.scheduler.register_to_config(prediction_type=prediction_type)
        return pipe

    def _check_tiny_weights(self, weights: str | None) -> None:
        if weights is not None and weights not in self.tiny_weights:
            raise ValueError(
                f"the tiny {self.name} pipeline has {' or '.join(self.tiny_weights)} weights, not {weights!r}"
            )

    # --- prompts --------------------------------------------------------------------------------
    def tokenize(self, pipe: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids ``{"input_ids": (B, L), "input_ids_2": ...}``, one entry per text encoder, each
        padded to its tokenizer's ``model_max_length`` and truncated."""
        ids = {}
        for name, tokenizer in zip(self.text_encoders, self.tokenizers(pipe).values()):
            length = tokenizer.model_max_length
            if self.max_sequence_length and "T5" in type(tokenizer).__name__:
                length = min(length, self.max_sequence_length)
            ids[self.token_key(name)] = tokenizer(
                list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
            ).input_ids
        return ids

    def encode_prompt(
        self, encoders: Mapping[str, nn.Module], batch: Mapping[str, Any], device: Any
    ) -> dict[str, Any]:
        """The denoiser's conditioning from token ids (``batch`` holds :meth:`tokenize`'s keys and may hold
        per-sample ``original_sizes`` / ``crop_top_lefts``): keyword arguments for :meth:`denoise`.
        ``encoders`` maps each text-encoder name to the module to call (the trained, prepared one)."""
        raise NotImplementedError

    def add_batch_conditioning(
        self, conditioning: dict[str, Any], batch: Mapping[str, Any], device: Any
    ) -> dict[str, Any]:
        """``conditioning`` of ``batch``'s prompts (cached, without :attr:`per_batch_conditioning`) completed
        with what depends on the batch's images, as :meth:`encode_prompt` computes it; by default nothing."""
        return conditioning

    # --- latents --------------------------------------------------------------------------------
    def encode_latents(self, vae: Any, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in ``[-1, 1]`` -> the latents ``(B, C, h, w)`` the denoiser is trained on,
        as the family's pipeline decodes them: by default a posterior sample, shifted by the VAE's
        ``shift_factor`` and scaled by its ``scaling_factor``."""
        posterior = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return self.latents_from(vae, posterior)

    def latents_from(self, vae: Any, posterior: Any) -> torch.Tensor:
        """The training latents from the VAE's posterior (a diffusers ``DiagonalGaussianDistribution``, e.g.
        rebuilt from a latent cache): by default a sample, shifted and scaled as :meth:`encode_latents` says."""
        latents = posterior.sample()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    # --- the denoiser ---------------------------------------------------------------------------
    def denoise(
        self,
        denoiser: nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: Mapping[str, Any],
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """The denoiser's prediction for ``noisy`` latents ``(B, C, h, w)`` at ``timesteps`` under
        ``conditioning``, shaped like ``noisy`` (``guidance_scale``: for guidance-distilled denoisers)."""
        states = conditioning["encoder_hidden_states"]
        extra = {k: v for k, v in conditioning.items() if k != "encoder_hidden_states"}
        return denoiser(noisy, timesteps, states, return_dict=False, **extra)[0]
