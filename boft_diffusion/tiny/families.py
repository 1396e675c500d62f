"""The other families' tiny pipelines (SDXL, SD3, Flux, FLUX.2 [klein]): stock diffusers pipelines with tiny
configs and random weights from a seed."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
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

from .sd import _SEEDED_INIT, _TINY_VAE_SHAPE, TINY_RESOLUTION, TINY_TEXT_CONFIG, _tiny_vae
from .tokenizers import (
    MAX_TOKENS,
    TINY_QWEN_MAX_TOKENS,
    build_tiny_qwen_tokenizer,
    build_tiny_t5_tokenizer,
    build_tiny_tokenizer,
)

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
