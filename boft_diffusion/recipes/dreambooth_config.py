"""The DreamBooth recipe's config (``boft-diffusion train dreambooth --help`` lists every key): the subject's data,
the metrics, the BOFT layout that taught the embedded default, and the run's defaults."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields

from ..data import parse_bucket_sizes
from ..metrics import (
    EVAL_GUIDANCE,
    EVAL_STEPS,
    world_dreambooth_probe,
)
from ..tiny import TINY_CLASS_PROMPT, TINY_INSTANCE_PROMPT
from ..training.args import (
    BOFTArgs,
    ConfigError,
    DataArgs,
    RecipeConfig,
    TrainArgs,
)

__all__ = [
    "DREAMBOOTH_TEXT_ENCODER_TARGETS",
    "DREAMBOOTH_UNET_TARGETS",
    "DreamBoothConfig",
    "DreamBoothDataArgs",
    "DreamBoothMetricsArgs",
]


DATASET_FILE_REPLACES = (
    "instance_data_dir", "instance_prompt", "class_data_dir", "class_prompt", "mask_dir", "class_context_prompts",
)  # fmt: skip
"""The data.* keys of the one concept that data.dataset_file replaces (each concept gives its own)."""


@dataclass
class DreamBoothDataArgs(DataArgs):
    """Subject (instance) images and prompt, prior-preservation class images, preprocessing."""

    instance_data_dir: str | None = None
    """Folder of subject photos (an optional <image name>.txt beside a photo is its prompt); null: toy images generated into <output_dir>/instance_images."""
    instance_prompt: str = TINY_INSTANCE_PROMPT
    """Prompt with the rare identifier of the subject, e.g. 'a photo of sks dog'."""
    dataset_file: str | None = None
    """A YAML or TOML file naming several concepts to train in one run (as kohya's dataset config): under 'concepts', each its instance_data_dir and instance_prompt, and optionally name, class_data_dir, class_prompt (needed with prior preservation), num_class_images, repeats (how many times each photo appears per epoch, default 1) and mask_dir; relative paths are from the file's folder. It replaces instance_data_dir, instance_prompt, class_data_dir, class_prompt, mask_dir and class_context_prompts (leave those unset). A concept trains on max(photos x repeats, class images) items an epoch, the smaller set cycling; class images missing from a concept's class_data_dir (default <output_dir>/class_images/<name>) are generated. Metrics measure the first concept, and every concept's own subject fidelity under per_prompt."""
    caption_extension: str = ".txt"
    """Extension of the per-image caption files."""
    num_generated_images: int = 5
    """How many toy images to generate when instance_data_dir is null."""
    with_prior_preservation: bool = True
    """Also train on class images (prompt: class_prompt) to keep the class's prior."""
    class_data_dir: str | None = None
    """Folder of class images; missing ones are generated with the base model and reused next time (null: <output_dir>/class_images)."""
    class_prompt: str | None = TINY_CLASS_PROMPT
    """Prompt of the class, e.g. 'a photo of dog' (required with prior preservation)."""
    num_class_images: int = 50
    """Class images to use (generated if the folder holds fewer)."""
    prior_loss_weight: float = 1.0
    """Weight of the class-image loss."""
    sample_batch_size: int = 4
    """Batch size when generating class images."""
    class_inference_steps: int = 25
    """Sampler steps when generating class images."""
    center_crop: bool = False
    """Center-crop to the resolution (false: random crop)."""
    random_flip: bool = False
    """Flip images horizontally at random."""
    class_context_prompts: list[str] = field(default_factory=list)
    """Prompts putting the class in contexts the subject should keep (e.g. 'a photo of a toy on a striped red background'): every other generated class image is sampled from the next of them and trained on it (its caption file), so prior preservation keeps those contexts as well as the class. Empty: every class image is of class_prompt."""
    buckets: bool = False
    """Aspect-ratio buckets: each instance image trains at the size of the bucket nearest its aspect (buckets of about resolution x resolution pixels, aspects 1:2 to 2:1), resized to cover it and cropped, instead of a square crop; every batch is drawn from one bucket, and class images are fitted to their batch's bucket. The buckets and how many images each holds are printed before training."""
    bucket_step: int = 0
    """Side step of the automatic buckets in pixels (0: resolution / 8, rounded to what the model can encode; kohya's bucket_reso_steps)."""
    bucket_sizes: list[str] = field(default_factory=list)
    """Your own buckets as WIDTHxHEIGHT (e.g. [512x768, 768x512, 640x640]) instead of the automatic ones; each must receive at least one image."""
    cache_latents: bool = False
    """Encode each training image (instance and class) with the VAE once, before training, and keep its posterior on disk in latent_cache_dir, keyed by the VAE's weights, the image file's bytes, the resolution and the crop: a changed image or VAE is encoded anew, never reused. Training still samples the posterior each step. Needs center_crop=true and random_flip=false (one crop per image)."""
    latent_cache_dir: str | None = None
    """Folder of the latent cache (null: <output_dir>/latent_cache); a shared folder serves several runs."""
    mask_dir: str | None = None
    """Folder of loss masks, one per instance image with the image's file stem (any image format, the image's size; white: the subject, black: the rest): only the masked area trains (see unmasked_loss_weight). null: no mask files."""
    alpha_mask: bool = False
    """Use each instance image's alpha channel as its loss mask (transparent: not trained)."""
    unmasked_loss_weight: float = 0.0
    """Weight of the loss outside the mask, in [0, 1] (0: only the masked area trains; 1: the mask has no effect). As kohya's masked loss, the weighted error is averaged over the whole image."""
    cache_prompt_embeddings: bool = False
    """Encode every training prompt (instance prompt, caption files, class prompt) once before training with the frozen text encoders, for large ones such as T5-XXL. The embeddings are kept on the CPU and written to prompt_embeddings.safetensors in data.class_data_dir (with prior preservation) or train.output_dir; a later run reuses that file when it was made by the same model family, text-encoder weights and prompts, and refuses one that was not (delete it to recompute). The encoders are then freed from training: never called by the loss, and on an accelerator moved to CPU memory (validation and metrics sampling move them back for their time). Needs boft.train_text_encoder=false."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_dataset_file()
        if not all(isinstance(p, str) and p.strip() for p in self.class_context_prompts):
            raise ConfigError(
                f"data.class_context_prompts must be non-blank prompts (got {self.class_context_prompts!r})"
            )
        if self.class_context_prompts and not self.with_prior_preservation:
            raise ConfigError(
                "data.class_context_prompts are class images: they need data.with_prior_preservation=true"
            )
        if self.bucket_step < 0 or (self.bucket_sizes and not self.buckets):
            raise ConfigError("data.bucket_step must be >= 0, and data.bucket_sizes needs data.buckets=true")
        try:
            parse_bucket_sizes(self.bucket_sizes)
        except ValueError as err:
            raise ConfigError(f"data.bucket_sizes: {err}") from None
        if self.cache_latents and (not self.center_crop or self.random_flip):
            raise ConfigError(
                "data.cache_latents keeps one latent per image: it needs data.center_crop=true and "
                "data.random_flip=false (a random crop or flip would change the image every epoch)"
            )
        if self.mask_dir and self.alpha_mask:
            raise ConfigError("data: give mask_dir or alpha_mask, not both")
        weight = self.unmasked_loss_weight
        if not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
            raise ConfigError(f"data.unmasked_loss_weight must be in [0, 1] (got {weight})")
        if (
            (self.mask_dir or self.alpha_mask)
            and self.instance_data_dir is None
            and self.dataset_file is None
        ):
            raise ConfigError(
                "data.mask_dir / data.alpha_mask mask your own photos: set data.instance_data_dir too "
                "(the generated views have no masks)"
            )
        if self.with_prior_preservation and not self.class_prompt:
            raise ConfigError(
                "data.with_prior_preservation needs data.class_prompt (e.g. 'a photo of a dog')"
            )
        if self.num_class_images < 1 or self.num_generated_images < 1 or self.sample_batch_size < 1:
            raise ConfigError(
                "data.num_class_images, num_generated_images and sample_batch_size must be >= 1"
            )
        if self.class_inference_steps < 1:
            raise ConfigError(f"data.class_inference_steps must be >= 1 (got {self.class_inference_steps})")
        weight = self.prior_loss_weight
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"data.prior_loss_weight must be a finite number >= 0 (got {weight})")

    def _check_dataset_file(self) -> None:
        """With data.dataset_file, the keys of the one concept it replaces keep their defaults."""
        if self.dataset_file is None:
            return
        if not self.dataset_file.strip():
            raise ConfigError("data.dataset_file is blank; give the path of a YAML or TOML file, or null")
        defaults = {f.name: f for f in fields(self)}
        for key in DATASET_FILE_REPLACES:
            default = defaults[key].default
            if default is MISSING:
                default = defaults[key].default_factory()
            if getattr(self, key) != default:
                raise ConfigError(
                    f"data.{key} is set together with data.dataset_file, which names every concept: give "
                    f"{key} per concept in the dataset file and leave data.{key} unset"
                )

    @property
    def masks(self) -> str:
        """How instance images carry their loss masks: ``none``, ``alpha`` or ``files`` (in mask_dir)."""
        return "files" if self.mask_dir else "alpha" if self.alpha_mask else "none"


@dataclass
class DreamBoothMetricsArgs:
    """What the run taught, measured on the base before training and on the result after it, as the
    DreamBooth paper does: subject fidelity (the samples of the instance prompt and of every context
    prompt vs the instance images), prompt fidelity (the subject in a context: is the context obeyed)
    and class drift (class prompt samples that show the subject). Written to metrics.json (each
    prompt's own values under per_prompt), the model card and the trackers."""

    scorer: str = "auto"
    """auto (the world scorer on the embedded tiny model, none otherwise), world, none, clip:PATH, dino:PATH or dino:PATH,clip:PATH (local transformers folders: subject by the first, prompts by CLIP)."""
    class_prompt: str | None = None
    """Prompt whose samples show class drift (null: data.class_prompt; on the tiny model 'a photo of a toy')."""
    context_prompts: list[str] = field(default_factory=lambda: list(world_dreambooth_probe().context_prompts))
    """Prompts that put the subject in a context (prompt fidelity)."""
    num_images: int = 4
    """Images per prompt; image i uses seed + i."""
    num_inference_steps: int = EVAL_STEPS
    """Sampler steps."""
    guidance_scale: float = EVAL_GUIDANCE
    """Classifier-free guidance scale."""
    seed: int = 0
    """Seed of each prompt's first image."""

    def __post_init__(self) -> None:
        if self.num_images < 1 or self.num_inference_steps < 1:
            raise ConfigError("metrics.num_images and metrics.num_inference_steps must be >= 1")
        if not self.context_prompts or not all(str(p).strip() for p in self.context_prompts):
            raise ConfigError(
                f"metrics.context_prompts must be a non-empty list of non-blank prompts (got {self.context_prompts!r})"
            )
        if self.class_prompt is not None and not self.class_prompt.strip():
            raise ConfigError("metrics.class_prompt is blank; give a prompt or null")


DREAMBOOTH_UNET_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj",
)  # fmt: skip
"""DreamBooth's default UNet targets: attention, the transformer blocks' projections and feed-forward, and
the ResNet convolutions and time projections (PEFT's BOFT DreamBooth example adapts these too). On the
tiny model, attention alone never taught the subject (subject fidelity 0.07 -> 0.10 at 300 steps); with
these it does (README, "What it teaches")."""

DREAMBOOTH_TEXT_ENCODER_TARGETS = ("q_proj", "k_proj")
"""DreamBooth's default text-encoder targets: the attention queries and keys only. Rotating them
changes which tokens the identifier attends to, while the values and the output projection, which
carry what every word means, stay as pretrained. On the tiny model, with v_proj and out_proj as well
the subject was learnt as well (0.64) but the context words lost their hold (prompt fidelity 0.69 ->
0.41: the instance views' backgrounds replaced the asked ones); with queries and keys only it keeps
more of them (0.59) at the same subject fidelity (0.62); seeds 0-2 in README, "What it teaches"."""


def _dreambooth_boft() -> BOFTArgs:
    """One butterfly factor of 16-wide blocks on DREAMBOOTH_UNET_TARGETS and the text encoder's queries
    and keys: the layout that taught the tiny model's subject best (scripts/compare_dreambooth.py
    compares m = 1, 2, 4)."""
    return BOFTArgs(
        block_size=16,
        block_num=0,
        n_butterfly_factor=1,
        unet_target_modules=list(DREAMBOOTH_UNET_TARGETS),
        text_encoder_target_modules=list(DREAMBOOTH_TEXT_ENCODER_TARGETS),
    )


@dataclass
class DreamBoothConfig(RecipeConfig):
    """A DreamBooth run; the defaults are the embedded tiny job (configs/dreambooth/tiny.yaml)."""

    boft: BOFTArgs = field(default_factory=_dreambooth_boft)
    data: DreamBoothDataArgs = field(default_factory=DreamBoothDataArgs)
    train: TrainArgs = field(default_factory=lambda: TrainArgs(train_batch_size=4, max_train_steps=500))
    metrics: DreamBoothMetricsArgs = field(default_factory=DreamBoothMetricsArgs)

    def __post_init__(self) -> None:
        if self.data.cache_prompt_embeddings and self.boft.train_text_encoder:
            raise ConfigError(
                "data.cache_prompt_embeddings=true needs boft.train_text_encoder=false: embeddings of text "
                "encoders that train change every step and cannot be computed once"
            )
