"""The embedded default: a tiny Stable Diffusion pipeline built offline from code.

Everything here is deterministic from a seed and needs no model hub, so the main job and every test
run offline on two CPU cores. The pipeline has the same component types as Stable Diffusion 1.x
(``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel`` + ``CLIPTokenizer``, a DDIM
scheduler with SD's beta schedule), only far smaller:

    image  (B, 3, 64, 64)  --VAE /4-->  latents (B, 4, 16, 16)
    prompt --tokenizer--> ids (B, 77) --CLIP--> hidden states (B, 77, 32) --> UNet cross-attention

The tokenizer is a real byte-level CLIP BPE tokenizer whose vocab and merges are learned here from a
small embedded corpus of prompt words; unknown words fall back to single-byte tokens.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
import threading
from collections import Counter
from functools import lru_cache
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
from PIL import Image, ImageDraw
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .atomic import atomic_file, staged_dir

__all__ = [
    "TINY_CLASS_PROMPT",
    "TINY_INSTANCE_PROMPT",
    "TINY_RESOLUTION",
    "build_tiny_controlnet",
    "build_tiny_pipeline",
    "build_tiny_tokenizer",
    "make_instance_images",
    "save_tiny_pipeline",
    "tiny_pipeline_path",
]

TINY_RESOLUTION = 64
"""Native image size in pixels (square); latents are ``TINY_RESOLUTION // 4`` = 16 on a side."""
TINY_INSTANCE_PROMPT = "a photo of sks toy"
TINY_CLASS_PROMPT = "a photo of a toy"
TINY_FORMAT_VERSION = 1
"""Bump when the architecture changes so cached folders from older code are rebuilt."""

MAX_TOKENS = 77
NUM_MERGES = 400
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_MARKER = "boft_tiny.json"
# Weight init draws from torch's global RNG: one seeded build at a time per process.
_SEEDED_INIT = threading.Lock()

# Prompts the BPE merges are learned from; word frequency decides merge order.
_CORPUS = """
a photo of sks dog. a photo of a dog. a photo of sks cat on the beach. a photo of a cat in the snow.
a photo of sks toy. a photo of a toy. a red toy on a wooden table. an orange toy in the grass.
a cute small dog sitting next to a tree. a fluffy cat sleeping on a soft blue chair.
a painting of a dog in the style of watercolor. an oil painting of a cat wearing a hat.
a drawing of a toy car on the street. a sketch of a house near a river at sunset.
a high quality photo of a person standing in front of a mountain lake.
a portrait of a woman with glasses, detailed, realistic, sharp focus.
a man riding a bike in the city at night with bright lights.
a child playing with a ball in the park on a sunny day.
a cartoon of a green frog jumping over a yellow flower in the garden.
a bowl of fruit on the kitchen table, apples, oranges and bananas.
a purple backpack on top of a white bed in a dark room.
a boat on the ocean under a cloudy sky, waves and sand.
a red car parked beside a forest road in autumn, golden leaves.
a teddy bear with a pink bow, plush, studio lighting, black background.
a robot made of shiny metal and glass, digital art, trending, render.
a vase with sunflowers, still life, canvas, brush strokes.
a castle on a hill, fantasy, epic, cinematic, wide angle.
a bird flying above the clouds, blue and orange colors, minimal.
a dog and a cat together in a basket, close up, macro, bokeh.
a toy robot inside a box, plastic, colorful, product shot.
"""


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    codes = printable + [256 + i for i in range(len(extra))]
    return dict(zip(printable + extra, map(chr, codes)))


def _corpus_words() -> Counter[tuple[str, ...]]:
    """Corpus words as byte-unicode symbol tuples, the last symbol carrying ``</w>``, with counts."""
    table = _byte_to_unicode()
    counts: Counter[tuple[str, ...]] = Counter()
    for word in re.findall(r"[a-z]+", _CORPUS.lower()):
        symbols = [table[b] for b in word.encode("utf-8")]
        counts[(*symbols[:-1], symbols[-1] + "</w>")] += 1
    return counts


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every adjacent occurrence of ``pair`` in ``word`` by the joined symbol."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


@lru_cache(maxsize=1)
def _learn_merges(num_merges: int = NUM_MERGES) -> tuple[tuple[str, str], ...]:
    """Greedy BPE on the corpus: merge the most frequent pair, ties broken by the pair itself."""
    words = _corpus_words()
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = Counter({_merge_pair(w, best): c for w, c in words.items()})
    return tuple(merges)


def _tokenizer_files(folder: Path) -> None:
    """Write CLIP-layout ``vocab.json`` and ``merges.txt`` into ``folder``.

    Vocab order follows CLIP: 256 bytes, the same with ``</w>``, one token per merge, then the
    special tokens last (so the EOS id is the largest, which CLIP's argmax pooling relies on).
    """
    symbols = list(_byte_to_unicode().values())
    merges = _learn_merges()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(m) for m in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer (~900 tokens) learned offline from the embedded corpus.

    ``tok(prompts, padding="max_length", max_length=77, truncation=True)`` gives ids of shape
    ``(B, 77)``: ``<|startoftext|>``, the BPE tokens, ``<|endoftext|>``, then ``<|endoftext|>`` padding.
    """
    with tempfile.TemporaryDirectory(prefix="boft-tiny-tok-") as folder:
        _tokenizer_files(Path(folder))
        return CLIPTokenizer.from_pretrained(
            folder, model_max_length=MAX_TOKENS, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
        )


TINY_UNET_CONFIG: dict = dict(
    sample_size=TINY_RESOLUTION // 4,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
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


def _tiny_vae() -> AutoencoderKL:
    """Three-stage VAE (two downsamplings): images (B, 3, H, W) <-> latents (B, 4, H/4, W/4)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
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


def build_tiny_pipeline(seed: int = 0, *, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """Build the tiny SD pipeline; the same seed gives bit-identical weights.

    The global torch RNG is left untouched (weights come from a forked RNG seeded with ``seed``).
    Native size is ``TINY_RESOLUTION`` px; any multiple of 8 px works.
    """
    tokenizer = build_tiny_tokenizer()
    with _SEEDED_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text_encoder = _tiny_unet(), _tiny_vae(), _tiny_text_encoder(tokenizer)
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


def save_tiny_pipeline(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build the tiny pipeline and save it as a diffusers folder (safetensors); returns the folder.

    The folder loads offline with ``StableDiffusionPipeline.from_pretrained(path)``.
    """
    path = Path(path)
    build_tiny_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path


def _default_cache_root() -> Path:
    return Path(os.environ.get("BOFT_DIFFUSION_CACHE", "~/.cache/boft_diffusion")).expanduser()


def _is_complete(folder: Path, seed: int) -> bool:
    """True when ``folder`` holds a finished save from this format version and seed."""
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == {"format_version": TINY_FORMAT_VERSION, "seed": seed}


def tiny_pipeline_path(cache_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    """Path of a saved tiny pipeline, built once per cache and reused afterwards.

    The folder is ``<cache_dir>/tiny-sd-seed{seed}``; ``cache_dir`` defaults to ``$BOFT_DIFFUSION_CACHE``
    or ``~/.cache/boft_diffusion``. It is built in a temporary folder beside the target and renamed
    into place, so concurrent processes never see a half-written folder: a stale folder (older
    format, unfinished) is replaced, a finished one another process put there meanwhile is kept.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_root()
    target = root / f"tiny-sd-seed{seed}"
    if _is_complete(target, seed):
        return target
    try:
        with staged_dir(target, replace=lambda found: not _is_complete(found, seed)) as staging:
            save_tiny_pipeline(staging, seed)
            marker = {"format_version": TINY_FORMAT_VERSION, "seed": seed}
            (staging / _MARKER).write_text(json.dumps(marker))
    except FileExistsError:
        if not _is_complete(target, seed):  # only a finished build by another process is a success
            raise
    return target


def _draw_toy(size: int, rng: random.Random) -> Image.Image:
    """One picture of the subject: an orange round toy with eyes, a smile and ears, on a plain color.

    Drawn at 4x and downsampled for smooth edges; position, scale and background vary with ``rng``.
    """
    big = size * 4
    background = tuple(rng.randint(90, 230) for _ in range(3))
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    radius = big * rng.uniform(0.22, 0.32)
    cx, cy = (rng.uniform(radius * 1.1, big - radius * 1.1) for _ in range(2))
    body, dark = (235, 100, 20), (40, 20, 10)
    for side in (-1, 1):  # ears
        ex, ey, er = cx + side * radius * 0.7, cy - radius * 0.75, radius * 0.35
        draw.ellipse((ex - er, ey - er, ex + er, ey + er), fill=body, outline=dark, width=big // 64)
    draw.ellipse(
        (cx - radius, cy - radius, cx + radius, cy + radius), fill=body, outline=dark, width=big // 64
    )
    for side in (-1, 1):  # eyes
        ex, ey, er = cx + side * radius * 0.38, cy - radius * 0.2, radius * 0.14
        draw.ellipse(
            (ex - er, ey - er, ex + er, ey + er), fill=(255, 255, 255), outline=dark, width=big // 96
        )
        draw.ellipse((ex - er / 2, ey - er / 3, ex + er / 2, ey + er * 2 / 3), fill=dark)  # pupil
    r = radius * 0.45  # smile: lower half of a circle below the eyes
    draw.arc((cx - r, cy - r * 0.4, cx + r, cy + r * 1.2), 20, 160, fill=dark, width=big // 48)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def make_instance_images(
    out_dir: str | os.PathLike[str], num_images: int = 5, seed: int = 0, resolution: int = TINY_RESOLUTION
) -> list[Path]:
    """Write ``num_images`` RGB PNGs (``resolution`` x ``resolution``) of one toy; returns their paths.

    Deterministic from ``seed``; files are named ``toy_00.png``, ``toy_01.png``, ...
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(num_images):
        path = out_dir / f"toy_{i:02d}.png"
        with atomic_file(path) as tmp:
            _draw_toy(resolution, rng).save(tmp, format="PNG")
        paths.append(path)
    return paths
