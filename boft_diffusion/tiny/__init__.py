"""The embedded default: a tiny Stable Diffusion pipeline built offline from code.

Everything here is deterministic from a seed and needs no model hub, so the main job and every test
run offline on two CPU cores. The pipeline has the same component types as Stable Diffusion 1.x
(``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel`` + ``CLIPTokenizer``, a DDIM
scheduler with SD's beta schedule), only far smaller:

    image  (B, 3, 64, 64)  --VAE /4-->  latents (B, 4, 16, 16)
    prompt --tokenizer--> ids (B, 77) --CLIP--> hidden states (B, 77, 32) --> UNet cross-attention

The tokenizer is a real byte-level CLIP BPE tokenizer whose vocab and merges are learned here from a
small embedded corpus of prompt words (every word of the world's captions is one token); unknown words
fall back to single-byte tokens.

Weights. :func:`build_tiny_pipeline` returns, by default, the pipeline pretrained on the procedural
world of :mod:`boft_diffusion.world` (captioned scenes of simple shapes): float16 safetensors shipped in
the package (``weights/tiny_world.safetensors``, ~3.5 MB), made by ``scripts/pretrain_tiny.py`` from a
seed on two CPU cores. Prompted with a world caption ("a photo of a small red circle on a striped blue
background"), it draws that scene. ``weights="random"`` builds the same architecture randomly
initialised from a seed, for tests that only need shapes.

Other families. :func:`build_tiny_sdxl_pipeline`, :func:`build_tiny_sd3_pipeline` and
:func:`build_tiny_flux_pipeline` build stock ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``
and ``FluxPipeline`` objects with tiny configs and random weights from a seed (no pretrained weights),
the T5 encoders of SD3 and Flux with the T5-style Unigram tokenizer of :func:`build_tiny_t5_tokenizer`.

The package: :mod:`.tokenizers` (the three tokenizers), :mod:`.sd` (the embedded default and its world
weights) and :mod:`.families` (the other families' tiny pipelines).
"""

from __future__ import annotations

from .families import (
    TINY_FLUX_TRANSFORMER_CONFIG,
    TINY_SDXL_UNET_CONFIG,
    TINY_TEXT_CONFIG_2,
    build_tiny_flux2_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
)
from .sd import (
    TINY_CLASS_PROMPT,
    TINY_FORMAT_VERSION,
    TINY_INSTANCE_PROMPT,
    TINY_RESOLUTION,
    TINY_TEXT_CONFIG,
    TINY_UNET_CONFIG,
    TINY_WORLD_WEIGHTS,
    WORLD_WEIGHTS_FORMAT,
    build_tiny_controlnet,
    build_tiny_pipeline,
    load_world_weights,
    make_instance_images,
    save_tiny_pipeline,
    save_world_weights,
    subject_views,
    tiny_pipeline_path,
)
from .tokenizers import (
    MAX_TOKENS,
    build_tiny_qwen_tokenizer,
    build_tiny_t5_tokenizer,
    build_tiny_tokenizer,
)

__all__ = [
    "TINY_FORMAT_VERSION",
    "WORLD_WEIGHTS_FORMAT",
    "MAX_TOKENS",
    "TINY_FLUX_TRANSFORMER_CONFIG",
    "TINY_SDXL_UNET_CONFIG",
    "TINY_TEXT_CONFIG",
    "TINY_TEXT_CONFIG_2",
    "TINY_UNET_CONFIG",
    "TINY_CLASS_PROMPT",
    "TINY_INSTANCE_PROMPT",
    "TINY_RESOLUTION",
    "build_tiny_controlnet",
    "build_tiny_flux2_pipeline",
    "build_tiny_flux_pipeline",
    "build_tiny_pipeline",
    "build_tiny_qwen_tokenizer",
    "build_tiny_sd3_pipeline",
    "build_tiny_sdxl_pipeline",
    "build_tiny_t5_tokenizer",
    "build_tiny_tokenizer",
    "load_world_weights",
    "make_instance_images",
    "save_tiny_pipeline",
    "save_world_weights",
    "subject_views",
    "tiny_pipeline_path",
    "TINY_WORLD_WEIGHTS",
]
