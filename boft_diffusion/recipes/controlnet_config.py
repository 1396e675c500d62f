"""The controllable-generation recipe's config (``boft-diffusion train controlnet --help`` lists every key): the
adapter, the control (light encoder or ControlNet), the image / control / caption data, validation and metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..data import ControlColumns
from ..inject import UNET_ATTENTION_TARGETS
from ..training.args import (
    BOFTArgs,
    ConfigError,
    DataArgs,
    OptimArgs,
    RecipeConfig,
    TrainArgs,
    ValidationArgs,
)

__all__ = [
    "ControlArgs",
    "ControlBOFTArgs",
    "ControlDataArgs",
    "ControlMetricsArgs",
    "ControlNetConfig",
    "ControlValidationArgs",
]


@dataclass
class ControlBOFTArgs(BOFTArgs):
    """The BOFT adapter; on the UNet (light mode, or controlnet mode with control.train_unet) and the ControlNet."""

    train_text_encoder: bool = False
    """The text encoder stays frozen in this recipe (the control, not new words, is what is learned)."""
    controlnet_target_modules: list[str] = field(default_factory=lambda: list(UNET_ATTENTION_TARGETS))
    """ControlNet module-name suffixes to adapt (controlnet mode)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_text_encoder:
            raise ConfigError("boft.train_text_encoder: the controlnet recipe keeps the text encoder frozen")


@dataclass
class ControlArgs:
    """How the control image enters the model."""

    mode: Literal["light", "controlnet"] = "controlnet"
    """light (a small encoder added to the UNet's first feature map) or controlnet (a stock ControlNetModel)."""
    encoder_block_out_channels: list[int] | None = None
    """Widths of the light encoder / the ControlNet's condition embedding; each after the first halves the
    size, so len = log2(VAE factor) + 1 (null: 16, 32, 96, 256 cut to fit: SD's four, the tiny model's three)."""
    controlnet_model_name_or_path: str | None = None
    """controlnet mode: a local ControlNet folder or hub id to start from (null: initialised from the UNet)."""
    train_unet: bool = False
    """controlnet mode: also rotate the UNet attention with BOFT (light mode always does)."""
    conditioning_scale: float = 1.0
    """controlnet mode: scale of the ControlNet's residuals when sampling."""
    seed: int = 0
    """Seed of the fresh control encoder's (or condition embedding's) initialisation."""

    def __post_init__(self) -> None:
        if self.mode not in ("light", "controlnet"):
            raise ConfigError(f"control.mode must be light or controlnet (got {self.mode!r})")
        widths = self.encoder_block_out_channels
        if widths is not None and (not widths or not all(isinstance(w, int) and w >= 1 for w in widths)):
            raise ConfigError(
                f"control.encoder_block_out_channels must be a list of integers >= 1 (got {widths})"
            )
        if not math.isfinite(self.conditioning_scale):
            raise ConfigError(f"control.conditioning_scale must be finite (got {self.conditioning_scale})")
        if self.mode == "light" and self.controlnet_model_name_or_path:
            raise ConfigError("control.controlnet_model_name_or_path is for control.mode=controlnet")

    def widths(self, vae_scale_factor: int) -> tuple[int, ...]:
        if self.encoder_block_out_channels is not None:
            return tuple(self.encoder_block_out_channels)
        return (16, 32, 96, 256)[: int(math.log2(vae_scale_factor)) + 1]


@dataclass
class ControlDataArgs(DataArgs):
    """Image / control-image / caption triples, and preprocessing."""

    train_data_dir: str | None = None
    """Folder in the Hugging Face imagefolder layout: metadata.jsonl rows naming the image, the control image and
    the caption (null and no dataset_name: scenes of the world with their edge maps, generated into <output_dir>/control_data)."""
    dataset_name: str | None = None
    """A `datasets` dataset by name or path (needs `pip install datasets`), instead of train_data_dir."""
    dataset_config_name: str | None = None
    """The dataset's configuration name."""
    cache_dir: str | None = None
    """Where `datasets` caches."""
    image_column: str = "image"
    """Column of the target image (in a folder: its path)."""
    conditioning_image_column: str = "conditioning_image"
    """Column of the control image."""
    caption_column: str = "text"
    """Column of the caption."""
    max_train_samples: int | None = None
    """Use only the first N rows."""
    num_generated_examples: int = 2000
    """How many world scenes to generate when no data is given."""
    condition_kind: Literal["edges", "mask"] = "edges"
    """The world's control map for generated data: edges or mask."""
    proportion_empty_prompts: float = 0.1
    """Share of captions replaced by the empty prompt (so that the control works without a prompt, and for CFG)."""
    center_crop: bool = True
    """Center-crop to the resolution (false: random crop; the same crop for image and control)."""
    random_flip: bool = False
    """Flip image and control together horizontally at random."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_data_dir and self.dataset_name:
            raise ConfigError("data: give train_data_dir or dataset_name, not both")
        if not (math.isfinite(self.proportion_empty_prompts) and 0 <= self.proportion_empty_prompts <= 1):
            raise ConfigError(
                f"data.proportion_empty_prompts must be in [0, 1] (got {self.proportion_empty_prompts})"
            )
        if self.num_generated_examples < 1 or (
            self.max_train_samples is not None and self.max_train_samples < 1
        ):
            raise ConfigError("data.num_generated_examples and data.max_train_samples must be >= 1")

    @property
    def columns(self) -> ControlColumns:
        return ControlColumns(self.image_column, self.conditioning_image_column, self.caption_column)


@dataclass
class ControlValidationArgs(ValidationArgs):
    """Periodic conditioned sampling: a row per (prompt, control image): the control image, then samples."""

    prompts: list[str] = field(default_factory=list)
    """Prompts, one per conditioning_images entry (empty: the metrics' first num_cases cases)."""
    conditioning_images: list[str] = field(default_factory=list)
    """Control image files, one per prompt."""
    num_cases: int = 4
    """Rows taken from the metrics' validation cases when no prompts are given."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.prompts) != len(self.conditioning_images):
            raise ConfigError(
                f"validation.prompts ({len(self.prompts)}) and validation.conditioning_images "
                f"({len(self.conditioning_images)}) must pair up one to one"
            )
        if self.num_cases < 1:
            raise ConfigError("validation.num_cases must be >= 1")


@dataclass
class ControlMetricsArgs:
    """Control fidelity, as the papers measure it: the control signal detected again on samples of
    held-out validation cases and scored against the condition (edge F1, mask IoU)."""

    detector: str = "auto"
    """auto (world on the embedded tiny model, edges otherwise), world, edges (gradient edges, for edge controls on real data) or none."""
    num_cases: int = 8
    """Held-out world scenes to measure on (the embedded default)."""
    prompts: list[str] = field(default_factory=list)
    """Your validation prompts (with conditioning_images; empty: the world's held-out scenes)."""
    conditioning_images: list[str] = field(default_factory=list)
    """Your validation control images, one per prompt (their binarised maps are the targets)."""
    num_images: int = 1
    """Samples per case; image i uses seed + i."""
    seed: int = 0
    """Seed of each case's first sample."""
    num_inference_steps: int = 20
    """Sampler steps."""
    guidance_scale: float = 4.0
    """Classifier-free guidance scale."""

    def __post_init__(self) -> None:
        if self.num_cases < 1 or self.num_images < 1 or self.num_inference_steps < 1:
            raise ConfigError("metrics.num_cases, num_images and num_inference_steps must be >= 1")
        if len(self.prompts) != len(self.conditioning_images):
            raise ConfigError(
                f"metrics.prompts ({len(self.prompts)}) and metrics.conditioning_images "
                f"({len(self.conditioning_images)}) must pair up one to one"
            )


@dataclass
class ControlNetConfig(RecipeConfig):
    """A controllable-generation run; the defaults are the embedded tiny job (configs/controlnet/tiny_controlnet.yaml)."""

    boft: ControlBOFTArgs = field(default_factory=ControlBOFTArgs)
    control: ControlArgs = field(default_factory=ControlArgs)
    data: ControlDataArgs = field(default_factory=ControlDataArgs)
    optim: OptimArgs = field(default_factory=lambda: OptimArgs(learning_rate=1e-3))
    train: TrainArgs = field(
        default_factory=lambda: TrainArgs(
            output_dir="outputs/controlnet-tiny", train_batch_size=4, max_train_steps=500, snr_gamma=1.0
        )
    )
    validation: ControlValidationArgs = field(default_factory=ControlValidationArgs)
    metrics: ControlMetricsArgs = field(default_factory=ControlMetricsArgs)
