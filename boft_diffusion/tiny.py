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
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from collections import Counter
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .atomic import atomic_file, staged_dir

__all__ = [
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

TINY_RESOLUTION = 64
"""Native image size in pixels (square); latents are ``TINY_RESOLUTION // 4`` = 16 on a side."""
TINY_INSTANCE_PROMPT = "a photo of sks toy"
TINY_CLASS_PROMPT = "a photo of a toy"
TINY_FORMAT_VERSION = 3
"""Bump when the architecture changes so cached folders from older code are rebuilt."""

MAX_TOKENS = 77
NUM_MERGES = 400
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_MARKER = "boft_tiny.json"
# Weight init draws from torch's global RNG: one seeded build at a time per process.
_SEEDED_INIT = threading.Lock()

# Prompts the BPE merges are learned from; word frequency decides merge order.
_CORPUS = (
    """
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
    + """
a photo of a small red circle on a blue background. a photo of a large green square on a yellow background.
a photo of a small blue triangle on a striped purple background. a photo of a large yellow star on a
checkered orange background. a photo of a small purple diamond on a speckled white background. a photo of
a large orange cross on a red background. a photo of a small white heart on a green background.
a photo of a large black toy on a striped blue background. a photo of sks toy on a checkered red background.
"""
    * 4
)


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
    return _greedy_merges(_corpus_words(), num_merges)


def _greedy_merges(words: Counter[tuple[str, ...]], num_merges: int) -> tuple[tuple[str, str], ...]:
    """Greedy BPE on ``words`` (symbol tuples with counts): merge the most frequent pair, ties broken by
    the pair itself."""
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
    Its files are written once per process (:func:`_tokenizer_folder`); each call reads them.
    """
    return CLIPTokenizer.from_pretrained(
        _tokenizer_folder().name,
        model_max_length=MAX_TOKENS, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
    )  # fmt: skip


def _tokenizer_folder() -> tempfile.TemporaryDirectory:
    """The tokenizer's ``vocab.json`` and ``merges.txt`` in a temporary folder, written once per process
    (removed at exit), so that building the pipeline writes nothing more (a full disk fails a command at
    its own output, not here); rewritten if the folder was removed meanwhile."""
    folder = _TOKENIZER_FOLDER.get("folder")
    if folder is None or not (Path(folder.name) / "merges.txt").is_file():
        folder = tempfile.TemporaryDirectory(prefix="boft-tiny-tok-")
        _tokenizer_files(Path(folder.name))
        _TOKENIZER_FOLDER["folder"] = folder
    return folder


_TOKENIZER_FOLDER: dict[str, tempfile.TemporaryDirectory] = {}


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


TINY_WORLD_WEIGHTS = Path(__file__).resolve().parent / "weights" / "tiny_world.safetensors"
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
    from .world import render, subject_scenes

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


# --- Other model families: SDXL, SD3 and Flux, as stock diffusers pipelines with tiny random weights ---
#
# Shapes at the native TINY_RESOLUTION (64 px), all VAEs downsampling by 4 (three stages):
#
#   SDXL  latents (B, 4, 16, 16);  UNet cross-attention on CLIP-1 (32) ++ CLIP-2 (64) = (B, 77, 96),
#         added conditioning: CLIP-2 pooled projection (B, 64) ++ 6 time ids x 8 = 112 features
#   SD3   latents (B, 16, 16, 16) -> 2x2 patches (B, 64, 64);  joint attention with context
#         [CLIP-1 ++ CLIP-2 (96) zero-padded to T5's 128 (B, 77, 128) ; T5 (B, S, 128)],
#         pooled CLIP-1 ++ CLIP-2 projections (B, 96)
#   Flux  latents (B, 16, 16, 16) packed 2x2 -> (B, 64, 64);  joint attention with T5 (B, S, 128),
#         pooled CLIP-1 (B, 32), guidance embedding
#
# S is the pipeline's ``max_sequence_length`` (T5 has relative positions, so any length works).

TINY_T5_MAX_TOKENS = 64
"""``model_max_length`` of the T5-style tokenizer (pipelines pad to their ``max_sequence_length``)."""
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-_/&+"

TINY_TEXT_CONFIG_2: dict = dict(
    hidden_size=64,
    intermediate_size=64,
    projection_dim=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS,
)
"""The second, wider CLIP text encoder (SDXL's and SD3's ``text_encoder_2``, the OpenCLIP-G slot)."""

TINY_T5_CONFIG: dict = dict(
    d_model=128,
    d_kv=32,
    d_ff=128,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    feed_forward_proj="gated-gelu",  # T5 v1.1, as the T5-XXL encoder of SD3 and Flux
    dropout_rate=0.0,
)
"""The tiny ``T5Config`` shape (vocabulary and special tokens come from the T5-style tokenizer)."""

TINY_SDXL_UNET_CONFIG: dict = dict(
    sample_size=TINY_RESOLUTION // 4,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    # SDXL's layout: no attention in the first (widest-resolution) block, more transformer layers deeper.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),  # diffusers' name for the number of heads: 16-channel heads at width 64
    use_linear_projection=True,
    cross_attention_dim=TINY_TEXT_CONFIG["hidden_size"] + TINY_TEXT_CONFIG_2["hidden_size"],
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=TINY_TEXT_CONFIG_2["projection_dim"] + 6 * 8,
    norm_num_groups=8,
)
"""The tiny SDXL-shaped ``UNet2DConditionModel`` config."""

TINY_SD3_TRANSFORMER_CONFIG: dict = dict(
    sample_size=TINY_RESOLUTION // 4,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    caption_projection_dim=64,  # must equal num_attention_heads * attention_head_dim
    joint_attention_dim=TINY_T5_CONFIG["d_model"],
    pooled_projection_dim=TINY_TEXT_CONFIG["projection_dim"] + TINY_TEXT_CONFIG_2["projection_dim"],
    pos_embed_max_size=32,  # latents up to 64 x 64, images up to 256 px
)
"""The tiny ``SD3Transformer2DModel`` config."""

TINY_FLUX_TRANSFORMER_CONFIG: dict = dict(
    patch_size=1,
    in_channels=4 * 16,  # 16 latent channels packed 2x2
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=TINY_T5_CONFIG["d_model"],
    pooled_projection_dim=TINY_TEXT_CONFIG["hidden_size"],  # CLIPTextModel's pooler output
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
)
"""The tiny ``FluxTransformer2DModel`` config."""


def _t5_vocab() -> list[tuple[str, float]]:
    """Unigram pieces in T5's order (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), scored by log frequency.

    Every corpus word is one ``▁word`` piece; ``▁`` and single characters (score -20, below any word)
    spell out the rest.
    """
    import math

    words = Counter(re.findall(r"[a-z]+", _CORPUS.lower()))
    total = sum(words.values())
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("▁", -10.0)]
    pieces += [
        ("▁" + w, math.log(c / total)) for w, c in sorted(words.items(), key=lambda wc: (-wc[1], wc[0]))
    ]
    pieces += [(ch, -20.0) for ch in _T5_CHARS]
    return pieces


def build_tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5-style Unigram tokenizer (~300 pieces) built from code: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2.

    Like T5's SentencePiece tokenizer it splits on whitespace with ``▁`` word-start markers and appends
    ``</s>``; corpus words are single pieces, other words are spelled by characters. ``tok(prompts,
    padding="max_length", max_length=S, truncation=True)`` gives ids of shape ``(B, S)``: pieces,
    ``</s>``, then ``<pad>`` (0). No sentinel ``<extra_id_*>`` tokens (only the encoder is used).
    """
    return T5Tokenizer(
        vocab=_t5_vocab(),
        eos_token=T5_EOS,
        unk_token=T5_UNK,
        pad_token=T5_PAD,
        extra_ids=0,
        model_max_length=TINY_T5_MAX_TOKENS,
    )


def _tiny_clip(tokenizer: CLIPTokenizer, shape: dict, with_projection: bool) -> CLIPTextModel:
    """A CLIP text encoder of ``shape``: ids (B, 77) -> hidden states (B, 77, hidden_size), SDPA attention;
    ``with_projection`` gives ``CLIPTextModelWithProjection`` (pooled ``text_embeds`` (B, projection_dim)).
    """
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _tiny_t5(tokenizer: T5Tokenizer) -> T5EncoderModel:
    """Two-layer T5 v1.1 encoder: ids (B, S) -> last hidden state (B, S, 128)."""
    config = T5Config(
        vocab_size=len(tokenizer),
        **TINY_T5_CONFIG,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _tiny_flow_vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """SD3/Flux-style VAE, 16 latent channels and no quant convs: images (B, 3, H, W) <-> (B, 16, H/4, W/4).

    Both pipelines decode ``latents / scaling_factor + shift_factor``; the factors are the real models'.
    """
    return AutoencoderKL(
        **_TINY_VAE_SHAPE,
        latent_channels=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _seeded(seed: int, make):
    """``make()`` under a forked CPU RNG seeded with ``seed``; the global RNG is left untouched."""
    with _SEEDED_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _finish(pipe, *modules):
    """Put ``modules`` in eval mode (as ``from_pretrained`` returns them) and silence the progress bar."""
    for module in modules:
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A tiny randomly initialised Stable Diffusion XL pipeline, deterministic from ``seed``.

    Components as SDXL: an SDXL-shaped UNet (``addition_embed_type="text_time"``), ``CLIPTextModel`` (32)
    and ``CLIPTextModelWithProjection`` (64) with the tiny CLIP tokenizer each, the tiny SD VAE
    (latents (B, 4, H/4, W/4)), Euler with SD's beta schedule. Text: (B, 77, 32) ++ (B, 77, 64) ->
    cross-attention states (B, 77, 96); pooled (B, 64) ++ 6 time ids x 8 -> the added embedding (112).
    The global torch RNG is left untouched; native size ``TINY_RESOLUTION``, any multiple of 8 px works.
    """
    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_tokenizer()
    unet, vae, text_encoder, text_encoder_2 = _seeded(
        seed,
        lambda: (
            UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG),
            _tiny_vae(),
            _tiny_clip(tokenizer, TINY_TEXT_CONFIG, with_projection=False),
            _tiny_clip(tokenizer_2, TINY_TEXT_CONFIG_2, with_projection=True),
        ),
    )
    unet.set_attn_processor(AttnProcessor2_0())
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    return _finish(pipe, unet, vae, text_encoder, text_encoder_2)


def build_tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A tiny randomly initialised Stable Diffusion 3 pipeline, deterministic from ``seed``.

    Components as SD3: an MMDiT ``SD3Transformer2DModel`` (2 joint blocks, 4 heads of 16, 2x2 patches),
    two ``CLIPTextModelWithProjection`` (32 and 64) with the tiny CLIP tokenizer, a T5 v1.1 encoder (128)
    with the T5-style tokenizer, a 16-channel VAE (latents (B, 16, H/4, W/4), SD3's scaling and shift),
    flow-matching Euler with SD3's shift 3. The context is CLIP (B, 77, 96) zero-padded to (B, 77, 128)
    followed by T5 (B, max_sequence_length, 128); the pooled vector is (B, 32 + 64).
    The global torch RNG is left untouched; image sides must be multiples of 8 px (VAE 4 x patch 2).
    """
    tokenizer, tokenizer_2, tokenizer_3 = (
        build_tiny_tokenizer(),
        build_tiny_tokenizer(),
        build_tiny_t5_tokenizer(),
    )
    transformer, vae, text_encoder, text_encoder_2, text_encoder_3 = _seeded(
        seed,
        lambda: (
            SD3Transformer2DModel(**TINY_SD3_TRANSFORMER_CONFIG),
            _tiny_flow_vae(scaling_factor=1.5305, shift_factor=0.0609),
            _tiny_clip(tokenizer, TINY_TEXT_CONFIG, with_projection=True),
            _tiny_clip(tokenizer_2, TINY_TEXT_CONFIG_2, with_projection=True),
            _tiny_t5(tokenizer_3),
        ),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return _finish(pipe, transformer, vae, text_encoder, text_encoder_2, text_encoder_3)


def build_tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A tiny randomly initialised Flux pipeline (guidance-distilled, like FLUX.1-dev), deterministic from ``seed``.

    Components as Flux: a ``FluxTransformer2DModel`` (1 double + 1 single block, 4 heads of 16, RoPE axes
    4 + 6 + 6), ``CLIPTextModel`` (32, pooled output only) with the tiny CLIP tokenizer, a T5 v1.1 encoder
    (128) with the T5-style tokenizer, a 16-channel VAE (latents (B, 16, H/4, W/4), Flux's scaling and
    shift) whose latents the pipeline packs 2x2 into tokens (B, H/8 * W/8, 64), flow-matching Euler with
    Flux's resolution-dependent shift. The global torch RNG is left untouched; image sides must be
    multiples of 8 px.
    """
    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_t5_tokenizer()
    transformer, vae, text_encoder, text_encoder_2 = _seeded(
        seed,
        lambda: (
            FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER_CONFIG),
            _tiny_flow_vae(scaling_factor=0.3611, shift_factor=0.1159),
            _tiny_clip(tokenizer, TINY_TEXT_CONFIG, with_projection=False),
            _tiny_t5(tokenizer_2),
        ),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return _finish(pipe, transformer, vae, text_encoder, text_encoder_2)


# --- FLUX.2 [klein]: Qwen3 prompts, a Flux.2 transformer on patchified, batch-norm-normalised latents ---
#
#   latents (B, 16, 16, 16) --2x2 patches, VAE batch norm--> (B, 64, 8, 8) --packed--> (B, 64 tokens, 64);
#   text: chat-templated prompt (B, 512) --Qwen3, hidden states 9, 18, 27 stacked--> (B, 512, 3 x 32)

QWEN_PAD, QWEN_IM_START, QWEN_IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN_THINK = ("<think>", "</think>")
TINY_QWEN_MAX_TOKENS = 512
"""``model_max_length`` of the tiny Qwen tokenizer: FLUX.2 [klein]'s ``max_sequence_length``."""
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
"""Qwen3's chat template, reduced to plain messages: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, then
the generation prompt with an empty think block when ``enable_thinking=False``."""

TINY_QWEN3_CONFIG: dict = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=27,  # Flux2KleinPipeline stacks hidden states 9, 18 and 27 by default
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=TINY_QWEN_MAX_TOKENS,
    tie_word_embeddings=True,
)
"""The tiny ``Qwen3Config`` shape (vocabulary and special tokens come from the tiny Qwen tokenizer)."""

TINY_FLUX2_TRANSFORMER_CONFIG: dict = dict(
    patch_size=1,
    in_channels=4 * 16,  # 16 latent channels in 2x2 patches
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=3 * TINY_QWEN3_CONFIG["hidden_size"],  # three stacked hidden states
    timestep_guidance_channels=32,
    mlp_ratio=3.0,
    axes_dims_rope=(4, 4, 4, 4),  # sums to attention_head_dim
    guidance_embeds=False,  # as klein
)
"""The tiny ``Flux2Transformer2DModel`` config (single blocks' fused widths: ``to_qkv_mlp_proj`` 64 -> 576,
``to_out`` 256 -> 64)."""


def _qwen_words() -> Counter[tuple[str, ...]]:
    """Corpus words as GPT-2 byte-level symbol tuples with the leading space (``Ġword``), with counts."""
    table = _byte_to_unicode()
    return Counter(
        tuple(table[b] for b in f" {word}".encode()) for word in re.findall(r"[a-z]+", _CORPUS.lower())
    )


@lru_cache(maxsize=1)
def _qwen_merges() -> tuple[tuple[str, str], ...]:
    return _greedy_merges(_qwen_words(), NUM_MERGES)


def build_tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2-style byte-level BPE tokenizer (~700 tokens) built from code, merges learned from the corpus.

    As Qwen's: GPT-2 byte-level pieces (every corpus word with its leading space is one ``Ġword`` token),
    Qwen's pre-tokenizer, ``<|endoftext|>`` padding (right), ``<|im_end|>`` as end of sequence, the chat
    tokens ``<|im_start|>`` / ``<|im_end|>`` and ``<think>`` / ``</think>``, and a reduced Qwen3 chat template
    (:data:`QWEN_CHAT_TEMPLATE`) that ``apply_chat_template(..., enable_thinking=False)`` accepts.
    """
    merges = _qwen_merges()
    tokens = [*_byte_to_unicode().values(), *("".join(m) for m in merges)]
    tokens += [QWEN_PAD, QWEN_IM_START, QWEN_IM_END, *QWEN_THINK]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(merges),
        unk_token=None,
        eos_token=QWEN_IM_END,
        pad_token=QWEN_PAD,
        extra_special_tokens=[QWEN_IM_START, QWEN_IM_END],
        model_max_length=TINY_QWEN_MAX_TOKENS,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    tokenizer.add_tokens(list(QWEN_THINK))
    return tokenizer


def _tiny_qwen3(tokenizer: Qwen2Tokenizer) -> Qwen3ForCausalLM:
    """A 27-layer Qwen3 language model of width 32: ids (B, L) -> hidden states (B, L, 32) x 28, SDPA."""
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        **TINY_QWEN3_CONFIG,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attn_implementation="sdpa",
    )
    return Qwen3ForCausalLM(config)


def _tiny_flux2_vae() -> AutoencoderKLFlux2:
    """Flux.2-style VAE, 16 latent channels: images (B, 3, H, W) <-> (B, 16, H/4, W/4), with latent
    batch-norm statistics of the 2x2 patches (64 channels) drawn from the seed (the pipeline normalises
    latents by them; a fresh BatchNorm's 0 / 1 would hide a missing normalisation)."""
    vae = AutoencoderKLFlux2(**_TINY_VAE_SHAPE, latent_channels=16)
    vae.bn.running_mean.copy_(0.1 * torch.randn_like(vae.bn.running_mean))
    vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return vae


def build_tiny_flux2_pipeline(seed: int = 0) -> Flux2KleinPipeline:
    """A tiny randomly initialised FLUX.2 [klein] pipeline, deterministic from ``seed``.

    Components as FLUX.2 [klein] (base, not step-distilled): a ``Flux2Transformer2DModel`` (1 double + 2
    single-stream blocks, 4 heads of 16, RoPE axes 4 x 4, no guidance embedding), a 27-layer
    ``Qwen3ForCausalLM`` (width 32) with the tiny Qwen tokenizer (:func:`build_tiny_qwen_tokenizer`), an
    ``AutoencoderKLFlux2`` with 16 latent channels (latents (B, 16, H/4, W/4), patchified 2x2 to 64 channels
    and normalised by its batch-norm statistics), flow-matching Euler with dynamic shifting. The prompt
    conditioning is Qwen3's hidden states 9, 18 and 27 stacked: (B, 512, 96). The global torch RNG is left
    untouched; image sides must be multiples of 8 px.
    """
    tokenizer = build_tiny_qwen_tokenizer()
    transformer, vae, text_encoder = _seeded(
        seed,
        lambda: (
            Flux2Transformer2DModel(**TINY_FLUX2_TRANSFORMER_CONFIG),
            _tiny_flux2_vae(),
            _tiny_qwen3(tokenizer),
        ),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )
    pipe = Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )
    return _finish(pipe, transformer, vae, text_encoder)
