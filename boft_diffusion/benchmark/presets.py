"""The model shapes the benchmark measures (tiny, SD 1.5, SDXL, Flux presets) and the methods it compares."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A model shape and how long to measure it."""

    name: str
    shape: str
    """Key of :data:`MODEL_SHAPES`: the model class, how it is fed and called, which layers are adapted."""
    model: dict[str, Any]
    """The model's config (``UNet2DConditionModel`` or ``FluxTransformer2DModel`` kwargs)."""
    text_encoder: dict[str, Any] | None
    """``CLIPTextConfig`` kwargs of a text encoder whose adapter is merged with the model's (or none)."""
    latent_size: int
    """Side of the latent grid: UNet latents are ``latent_size²``, Flux's packed image tokens too."""
    warmup_steps: int
    timed_steps: int
    forward_repeats: int
    merge_repeats: int
    rounds: int
    """Default number of interleaved rounds (each method runs once per round)."""
    text_tokens: int = 77
    """Length of the text sequence the model attends to."""


SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 1),  # SDXL: (1, 2, 10), and 10 in the mid block
    attention_head_dim=(5, 10, 20),  # diffusers' name for the number of heads: 64-channel heads
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # pooled text embeds (1280) + 6 time ids x 256
    norm_num_groups=32,
)
"""SDXL's UNet config at full width, with one transformer layer per attention block (see ``sdxl``)."""
FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels packed 2x2
    num_layers=1,  # FLUX.1: 19 double-stream blocks
    num_single_layers=1,  # FLUX.1: 38 single-stream blocks
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
"""FLUX.1-dev's transformer config at full width (3072), one block of each kind (see ``flux``)."""
CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)


def _tiny_preset() -> Preset:
    from ..tiny import TINY_TEXT_CONFIG, TINY_UNET_CONFIG  # (imports diffusers: only when measured)

    return Preset(
        "tiny", "unet", TINY_UNET_CONFIG, {"vocab_size": 49408, **TINY_TEXT_CONFIG}, 16, 2, 3, 3, 2, 1
    )


def _sd15_preset() -> Preset:
    """SD 1.5's UNet (860M parameters) and CLIP-L text encoder, 32×32 latents, batch 1."""
    return Preset("sd15", "unet", SD15_UNET, CLIP_L_TEXT, 32, 2, 3, 3, 3, 2)


def _sdxl_preset() -> Preset:
    """SDXL's UNet at full width, fewer transformer layers: 641M parameters (SDXL: 2.57B).

    Kept from SDXL: block widths (320, 640, 1280), two resnets per down block (three per up block),
    no attention in the first block, 64-channel heads, linear projections, cross-attention on
    2048-wide text states, the ``text_time`` added conditioning (pooled text embeds (B, 1280) and 6
    time ids embedded at 256 = 2816 features). Reduced: ``transformer_layers_per_block`` from
    (1, 2, 10) to (1, 1, 1), and the mid block's from 10 to 1, i.e. 11 transformer blocks instead
    of 70; every attention projection of SDXL's shapes is still there. Inputs: 32×32 latents, batch
    1, 77 text tokens. Merge time includes a CLIP-L text encoder (SDXL's first; not OpenCLIP-bigG).
    """
    return Preset("sdxl", "unet", SDXL_UNET, CLIP_L_TEXT, 32, 1, 3, 2, 2, 1)


def _flux_preset() -> Preset:
    """A FLUX.1-dev transformer slice at full width: 546M parameters (FLUX.1: 11.9B).

    Kept from FLUX.1-dev: width 3072 (24 heads of 128), rotary axes (16, 56, 56), T5-XXL-wide text
    states (4096), CLIP-L pooled projections (768), packed 64-channel latents, guidance embedding.
    Reduced: one double-stream block (FLUX.1: 19) and one single-stream block (FLUX.1: 38).
    Inputs: 256 image tokens (32×32 latents packed 2×2: a 256-px image), 64 text tokens, batch 1.
    Merge time is the transformer's alone (Flux's text encoders are usually not adapted).
    """
    return Preset("flux", "flux", FLUX_TRANSFORMER, None, 16, 1, 3, 2, 2, 1, text_tokens=64)


class _Presets(Mapping[str, Preset]):
    """Presets by name, built on first use (so ``--help`` lists them without importing diffusers)."""

    _builders: dict[str, Callable[[], Preset]] = {
        "sd15": _sd15_preset,
        "sdxl": _sdxl_preset,
        "flux": _flux_preset,
        "tiny": _tiny_preset,
    }

    def __getitem__(self, name: str) -> Preset:
        return self._builders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)


PRESETS = _Presets()
"""The model shapes: ``sd15`` (SD-1.5 UNet, CLIP-L), ``sdxl`` (SDXL UNet at full width, fewer
transformer layers), ``flux`` (Flux transformer at full width, one block of each kind) and ``tiny``
(the embedded tiny pipeline's UNet)."""


@dataclass(frozen=True)
class Method:
    """An adapter to measure: ``kind`` is ``none`` (the floor), ``boft`` (ours), ``lora`` /
    ``peft-boft`` / ``peft-oft`` (PEFT) or ``lycoris-boft`` (LyCORIS)."""

    key: str
    label: str
    kind: str
    options: dict[str, int] = field(default_factory=dict)

    def unavailable_reason(self) -> str | None:
        """Why this method cannot run here (a missing package), or ``None`` when it can."""
        if self.kind in ("lora", "peft-boft", "peft-oft") and find_spec("peft") is None:
            return "the peft package is not installed (pip install peft)"
        if self.kind == "lycoris-boft" and find_spec("lycoris") is None:
            return "the lycoris package is not installed (pip install lycoris-lora)"
        return None

    def available(self) -> bool:
        return self.unavailable_reason() is None


METHODS = {
    m.key: m
    for m in (
        Method("floor", "no adapter (floor)", "none"),
        Method("lora", "PEFT LoRA r=8", "lora", {"r": 8}),
        Method("peft-boft", "PEFT BOFT b=8, m=1", "peft-boft", {"b": 8, "m": 1}),
        Method("peft-oft", "PEFT OFT b=32", "peft-oft", {"b": 32}),
        # LyCORIS picks the block size from a factor: the largest even b <= factor with d / b a
        # power of two (SD widths 320 / 640 / 1280: b = 10; no b <= 8 divides them that way).
        Method("lycoris-boft", "LyCORIS BOFT factor 10", "lycoris-boft", {"b": 10}),
        Method("boft-b8-m1", "BOFT b=8, m=1", "boft", {"b": 8, "m": 1}),
        Method("boft-b8-m2", "BOFT b=8, m=2", "boft", {"b": 8, "m": 2}),
        Method("boft-b4-m4", "BOFT b=4, m=4", "boft", {"b": 4, "m": 4}),
    )
}


def unavailable_methods(methods: list[Method]) -> dict[str, str]:
    """``{key: reason}`` of the methods that cannot run here."""
    return {m.key: reason for m in methods if (reason := m.unavailable_reason()) is not None}
