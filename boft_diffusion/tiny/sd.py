"""The embedded default: the tiny Stable Diffusion pipeline, its world weights, the cached folder of it and
the DreamBooth subject's views."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

from ..atomic import atomic_file, staged_dir
from .tokenizers import MAX_TOKENS, build_tiny_tokenizer

TINY_RESOLUTION = 64
"""Native image size in pixels (square); latents are ``TINY_RESOLUTION // 4`` = 16 on a side."""
TINY_INSTANCE_PROMPT = "a photo of sks toy"
TINY_CLASS_PROMPT = "a photo of a toy"
TINY_FORMAT_VERSION = 3
"""Bump when the architecture changes so cached folders from older code are rebuilt."""

_MARKER = "boft_tiny.json"
# Weight init draws from torch's global RNG: one seeded build at a time per process.
_SEEDED_INIT = threading.Lock()

# Prompts the BPE merges are learned from; word frequency decides merge order.
TINY_UNET_CONFIG: dict = dict(
    sample_size=TINY_RESOLUTION // 4,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=1,
    norm_num_groups=8,
)
"""The tiny ``UNet2DConditionModel`` config (also the benchmark's ``tiny`` preset)."""

TINY_TEXT_CONFIG: dict = dict(
    hidden_size=32,
    intermediate_size=37,
    projection_dim=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS,
)
"""The tiny ``CLIPTextConfig`` shape (vocabulary and special tokens come from the tokenizer)."""


def _tiny_unet() -> UNet2DConditionModel:
    """SD-shaped UNet: latents (B, 4, 16, 16), cross-attention on (B, 77, 32) text states.

    Cross-attention sits at both widths (32 channels in the first block, 64 in the mid block), so
    adapters see projections of several shapes, as in a real UNet.
    """
    return UNet2DConditionModel(**TINY_UNET_CONFIG)


_TINY_VAE_SHAPE: dict = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=TINY_RESOLUTION,
)
"""The tiny VAEs' shape: three stages, two downsamplings (latent channels and factors per family)."""


def _tiny_vae() -> AutoencoderKL:
    """Three-stage VAE (two downsamplings): images (B, 3, H, W) <-> latents (B, 4, H/4, W/4)."""
    return AutoencoderKL(
        **_TINY_VAE_SHAPE,
        latent_channels=4,
        scaling_factor=0.18215,  # explicit, so that the world weights' measured factor is never "a default"
    )


def _tiny_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """Two-layer CLIP text encoder: ids (B, 77) -> last hidden state (B, 77, 32), SDPA attention."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        **TINY_TEXT_CONFIG,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    return CLIPTextModel(config)


def _tiny_scheduler(prediction_type: str) -> DDIMScheduler:
    """DDIM with Stable Diffusion's beta schedule; samples in a few steps.

    Training builds its own ``DDPMScheduler.from_config(pipe.scheduler.config)``.
    """
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


TINY_WORLD_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "tiny_world.safetensors"
"""The shipped weights of the tiny pipeline pretrained on the world (``scripts/pretrain_tiny.py``)."""
WORLD_WEIGHTS_FORMAT = "boft_diffusion.tiny_world"
_WORLD_COMPONENTS = ("unet", "vae", "text_encoder")


def save_world_weights(
    pipe: StableDiffusionPipeline, path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """Write the pipeline's UNet, VAE and text encoder as one float16 safetensors file, atomically.

    Keys are ``<component>.<parameter>``; the metadata holds the format, the tiny architecture version,
    the VAE's latent scaling factor and whatever ``metadata`` adds (pretraining settings).
    """
    from safetensors.torch import save_file

    tensors = {
        f"{name}.{key}": value.detach().to(torch.float16).contiguous()
        for name in _WORLD_COMPONENTS
        for key, value in getattr(pipe, name).state_dict().items()
    }
    info = {
        "format": WORLD_WEIGHTS_FORMAT,
        "tiny_format_version": str(TINY_FORMAT_VERSION),
        "vocab_size": str(pipe.text_encoder.config.vocab_size),
        "scaling_factor": repr(float(pipe.vae.config.scaling_factor)),
        **(metadata or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=info)
    return path


def load_world_weights(
    pipe: StableDiffusionPipeline,
    path: str | os.PathLike[str] = TINY_WORLD_WEIGHTS,
    components: tuple[str, ...] = _WORLD_COMPONENTS,
) -> dict[str, str]:
    """Load weights written by :func:`save_world_weights` into a tiny pipeline; returns their metadata.

    Every key and shape is checked before any component changes; a file for another architecture or
    tokenizer is refused with what differs. Tensors are cast to each component's dtype.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no tiny world weights at {path}; `python scripts/pretrain_tiny.py --out {path}` makes them"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            info = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    if info.get("format") != WORLD_WEIGHTS_FORMAT:
        raise ValueError(f"{path} is not a tiny world weights file (format {info.get('format')!r})")
    if info.get("tiny_format_version") != str(TINY_FORMAT_VERSION):
        raise ValueError(
            f"{path} was made for tiny architecture version {info.get('tiny_format_version')}, this code "
            f"builds version {TINY_FORMAT_VERSION}; rerun scripts/pretrain_tiny.py"
        )
    states = {}
    for name in components:
        module = getattr(pipe, name)
        expected = module.state_dict()
        found = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{path} does not fit the tiny {name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        for key, value in expected.items():
            if found[key].shape != value.shape:
                raise ValueError(
                    f"{path}: {name}.{key} has shape {tuple(found[key].shape)}, the model {tuple(value.shape)}"
                )
        states[name] = {k: v.to(expected[k].dtype) for k, v in found.items()}
    for name, state in states.items():
        getattr(pipe, name).load_state_dict(state)
    if "vae" in components:
        pipe.vae.register_to_config(scaling_factor=float(info["scaling_factor"]))
    return info


def build_tiny_pipeline(
    seed: int = 0,
    *,
    prediction_type: str = "epsilon",
    weights: str | os.PathLike[str] = "world",
) -> StableDiffusionPipeline:
    """Build the tiny SD pipeline: by default the one pretrained on the world, shipped in the package.

    ``weights="world"`` loads ``TINY_WORLD_WEIGHTS`` (``seed`` is then unused); a path loads other
    weights written by :func:`save_world_weights`; ``weights="random"`` is a random initialisation
    from ``seed`` (the same seed gives bit-identical weights), for tests that only need shapes.
    The learned weights predict noise (``prediction_type="epsilon"``); a random build takes either.

    The global torch RNG is left untouched (weights come from a forked RNG seeded with ``seed``).
    Native size is ``TINY_RESOLUTION`` px; any multiple of 8 px works.
    """
    learned = not (isinstance(weights, str) and weights == "random")
    if learned and prediction_type != "epsilon":
        raise ValueError(
            f"the pretrained tiny pipeline predicts noise ('epsilon'), not {prediction_type!r}; "
            "use weights='random' for another prediction type"
        )
    tokenizer = build_tiny_tokenizer()
    with _SEEDED_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text_encoder = _tiny_unet(), _tiny_vae(), _tiny_text_encoder(tokenizer)
    for module in (unet, vae, text_encoder):
        module.eval()  # as from_pretrained returns them (train mode changes the text encoder's kernels)
    unet.set_attn_processor(AttnProcessor2_0())
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_tiny_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if learned:
        load_world_weights(pipe, TINY_WORLD_WEIGHTS if weights == "world" else weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_controlnet(
    pipe_or_unet: StableDiffusionPipeline | UNet2DConditionModel, seed: int = 0
) -> ControlNetModel:
    """A ControlNet copied from the tiny UNet (zero-initialised output convolutions).

    Its conditioning embedding downsamples by 4, matching the VAE: a control image
    (B, 3, H, W) becomes (B, 32, H/4, W/4) features added to the latents' first block.
    """
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    with _SEEDED_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32))
    controlnet.set_attn_processor(AttnProcessor2_0())
    return controlnet


def save_tiny_pipeline(
    path: str | os.PathLike[str], seed: int = 0, *, weights: str | os.PathLike[str] = "world"
) -> Path:
    """Build the tiny pipeline (``weights`` as :func:`build_tiny_pipeline`) and save it as a diffusers
    folder (safetensors); returns the folder, which loads offline with ``StableDiffusionPipeline.from_pretrained``.
    """
    path = Path(path)
    build_tiny_pipeline(seed, weights=weights).save_pretrained(path, safe_serialization=True)
    return path


def _default_cache_root() -> Path:
    return Path(os.environ.get("BOFT_DIFFUSION_CACHE", "~/.cache/boft_diffusion")).expanduser()


def _marker(seed: int, weights: str) -> dict:
    """What a finished cached folder must record: the architecture version and which weights it holds."""
    if weights == "random":
        return {"format_version": TINY_FORMAT_VERSION, "weights": "random", "seed": seed}
    import hashlib

    digest = hashlib.sha256(TINY_WORLD_WEIGHTS.read_bytes()).hexdigest()[:16]
    return {"format_version": TINY_FORMAT_VERSION, "weights": "world", "sha256": digest}


def _is_complete(folder: Path, marker: dict) -> bool:
    """True when ``folder`` holds a finished save recording ``marker``."""
    try:
        found = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return found == marker


def tiny_pipeline_path(
    cache_dir: str | os.PathLike[str] | None = None, seed: int = 0, *, weights: str = "world"
) -> Path:
    """Path of the tiny pipeline saved as a diffusers folder (for ``--base`` of the CLI verbs), built once
    per cache and reused afterwards.

    The folder is ``<cache_dir>/tiny-sd-world`` (``weights="world"``, the shipped pretrained weights) or
    ``<cache_dir>/tiny-sd-random-seed{seed}``; ``cache_dir`` defaults to ``$BOFT_DIFFUSION_CACHE`` or
    ``~/.cache/boft_diffusion``. It is built in a temporary folder beside the target and renamed into
    place, so concurrent processes never see a half-written folder: a stale folder (older format, other
    weights, unfinished) is replaced, a finished one another process put there meanwhile is kept.
    """
    if weights not in ("world", "random"):
        raise ValueError(f"weights must be 'world' or 'random' (got {weights!r})")
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_root()
    target = root / ("tiny-sd-world" if weights == "world" else f"tiny-sd-random-seed{seed}")
    marker = _marker(seed, weights)
    if _is_complete(target, marker):
        return target
    try:
        with staged_dir(target, replace=lambda found: not _is_complete(found, marker)) as staging:
            save_tiny_pipeline(staging, seed, weights=weights)
            (staging / _MARKER).write_text(json.dumps(marker))
    except FileExistsError:
        if not _is_complete(target, marker):  # only a finished build by another process is a success
            raise
    return target


def subject_views(num_images: int = 5, seed: int = 0, resolution: int = TINY_RESOLUTION) -> list[Image.Image]:
    """The DreamBooth subject's instance images, RGB ``resolution`` x ``resolution``: the quickstart's.

    The world's ``sks toy`` (a pink-and-teal striped star the pretraining world never shows) in
    ``world.subject_scenes(num_images, seed)``: large, on varied plain backgrounds, in views the tiny
    VAE reconstructs well (a test checks each against the shipped weights). ``boft-diffusion eval``
    compares samples with the same images.
    """
    from ..world import render, subject_scenes

    scenes = subject_scenes(num_images, seed)
    return [Image.fromarray(render(scene, resolution)[0], mode="RGB") for scene in scenes]


def make_instance_images(
    out_dir: str | os.PathLike[str], num_images: int = 5, seed: int = 0, resolution: int = TINY_RESOLUTION
) -> list[Path]:
    """Write :func:`subject_views` as PNGs ``toy_00.png``, ``toy_01.png``, ... in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(subject_views(num_images, seed, resolution)):
        path = out_dir / f"toy_{i:02d}.png"
        with atomic_file(path) as tmp:
            image.save(tmp, format="PNG")
        paths.append(path)
    return paths
