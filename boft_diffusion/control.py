"""Light control: a small condition encoder whose features join the stock UNet's first feature map.

The BOFT and OFT papers make Stable Diffusion follow a control image with a small trainable encoder
plus orthogonal finetuning of the UNet attention, instead of ControlNet's trainable copy of the
UNet's encoder (PEFT's ``boft_controlnet`` example does the same). Here::

    h0 = conv_in(z_t) + E(c)        c: (B, C, H, W) control image in [0, 1]
                                    E: diffusers' ControlNetConditioningEmbedding, (B, C, H, W) ->
                                       (B, conv_in.out_channels, H / 2**(k-1), W / 2**(k-1)),
                                       k = len(block_out_channels), its output convolution zero-initialised

so an untrained encoder leaves the UNet exactly as it was. ``E`` is the stock class ControlNet itself
uses for its condition; the addition is a forward hook on the UNet's ``conv_in``, removable, that
leaves the UNet's modules, state dict and attention processors untouched.

On a pipeline the encoder is the component ``control_encoder`` (a plain attribute of the stock
pipeline; :data:`~boft_diffusion.pipeline.BOFT_LOADABLE_COMPONENTS` lists it), trained in full as a
BOFT adapter's ``modules_to_save`` with no adapted layers, so saving, loading, checkpoints, enabling
and disabling go through the same adapter verbs as the UNet's rotations. With the adapter disabled
the original (zero-output) encoder is in effect: the base model.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from PIL import Image
from torch import nn

from .pipeline import base_fingerprint
from .sampling import seeded_images

__all__ = [
    "CONTROL_COMPONENT",
    "CONTROL_METADATA",
    "CONTROLNET_FINGERPRINTS",
    "LIGHT_CONTROL_METADATA",
    "LightControl",
    "LightControlConfig",
    "add_light_control",
    "claim_problem",
    "condition_embedding_shapes",
    "control_tensor",
    "controlnet_fingerprints",
    "controlnet_from_unet",
    "controlnet_pipeline",
    "light_control",
    "load_light_control",
    "remove_light_control",
    "residuals_in",
    "sample_with_control",
    "save_light_control",
]

CONTROL_COMPONENT = "control_encoder"
"""The pipeline attribute (and adapter component) of the light control encoder."""


@dataclass(frozen=True)
class LightControlConfig:
    """Shape of the light control encoder (stored in the adapter file, so a file rebuilds its encoder)."""

    embedding_channels: int
    """Channels of the UNet's first feature map (``unet.conv_in.out_channels``)."""
    conditioning_channels: int = 3
    """Channels of the control image."""
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    """Encoder widths; each step after the first halves the size (SD: 4 widths, 8x down, as its VAE)."""

    def __post_init__(self) -> None:
        widths = tuple(self.block_out_channels)
        object.__setattr__(self, "block_out_channels", widths)
        numbers = (self.embedding_channels, self.conditioning_channels, *widths)
        if not widths or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in numbers):
            raise ValueError(
                "LightControlConfig: embedding_channels, conditioning_channels and every block_out_channels "
                f"entry must be integers >= 1 (got {self})"
            )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{key: shape}`` of the encoder this config builds (``ControlNetConditioningEmbedding``'s state-dict
        keys), computed on the meta device: nothing is allocated, whatever the widths claim."""
        return condition_embedding_shapes(
            self.embedding_channels, self.conditioning_channels, self.block_out_channels
        )

    @property
    def downsample(self) -> int:
        """Control image size / feature size."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "block_out_channels": list(self.block_out_channels)}

    @classmethod
    def from_dict(cls, raw: Any) -> LightControlConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"a light control config is a JSON object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - {"embedding_channels", "conditioning_channels", "block_out_channels"})
        if unknown:
            raise ValueError(f"unknown light control config keys {unknown}")
        blocks = raw.get("block_out_channels", cls.block_out_channels)
        if not isinstance(blocks, list | tuple):
            raise ValueError(f"block_out_channels must be a list of integers, got {blocks!r}")
        return cls(raw.get("embedding_channels"), raw.get("conditioning_channels", 3), tuple(blocks))


class LightControl(nn.Module):
    """The encoder ``E`` and its hook on a UNet's ``conv_in``: ``h0 = conv_in(z_t) + E(c)``.

    ``forward(c)`` is ``E(c)``. While :meth:`adding` (training: features from the prepared encoder)
    or :meth:`conditioned` (sampling: features of a control image) is active, the hook adds the
    features to every ``conv_in`` output, repeated over the batch when the pipeline doubled it for
    classifier-free guidance; outside them the UNet runs as if the hook were not there.
    """

    def __init__(self, config: LightControlConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ControlNetConditioningEmbedding(
            config.embedding_channels, config.conditioning_channels, config.block_out_channels
        )
        self._features: torch.Tensor | None = None
        self._handle: Any = None  # the hook on a UNet's conv_in (the UNet is not held: not a submodule)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` control images in [0, 1] -> ``(B, embedding_channels, H/d, W/d)`` features."""
        return self.encoder(condition)

    # --- the hook ------------------------------------------------------------------------------------
    def attach(self, unet: nn.Module) -> None:
        """Hook onto ``unet.conv_in`` (one UNet at a time); raises if the widths do not fit."""
        conv_in = getattr(unet, "conv_in", None)
        if not isinstance(conv_in, nn.Conv2d):
            raise ValueError(
                f"light control needs a UNet with a Conv2d conv_in; {type(unet).__name__} has none"
            )
        if conv_in.out_channels != self.config.embedding_channels:
            raise ValueError(
                f"the light control encoder outputs {self.config.embedding_channels} channels, the UNet's "
                f"conv_in {conv_in.out_channels}: this encoder was made for another model"
            )
        self.detach()
        self._handle = conv_in.register_forward_hook(self._add)

    def detach(self) -> None:
        """Remove the hook (the UNet is exactly as before)."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def _add(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        features = self._features
        if features is None:
            return None
        if features.shape[-2:] != output.shape[-2:]:
            raise ValueError(
                f"the control image gives {tuple(features.shape[-2:])} features, the UNet's first feature map "
                f"is {tuple(output.shape[-2:])}: the control image must be {self.config.downsample}x the "
                "latent size (the size of the images generated)"
            )
        if output.shape[0] != features.shape[0]:
            if output.shape[0] % features.shape[0]:
                raise ValueError(
                    f"batch of {output.shape[0]} latents for {features.shape[0]} control images: give one "
                    "control image per prompt image, or one for all"
                )
            features = features.repeat(output.shape[0] // features.shape[0], 1, 1, 1)  # CFG: [uncond; cond]
        return output + features.to(output.dtype)

    @contextmanager
    def adding(self, features: torch.Tensor) -> Iterator[None]:
        """Add these ``(B, C, h, w)`` features to ``conv_in``'s output inside the block."""
        if not self.attached:
            raise RuntimeError("the light control encoder is not attached to a UNet")
        previous, self._features = self._features, features
        try:
            yield
        finally:
            self._features = previous

    @contextmanager
    def conditioned(self, condition: torch.Tensor) -> Iterator[None]:
        """Sample under control: ``condition`` ``(B or 1, C, H, W)`` in [0, 1], encoded once for all steps."""
        param = next(self.parameters())
        with torch.no_grad():
            features = self(condition.to(device=param.device, dtype=param.dtype))
        with self.adding(features):
            yield


# --- on a pipeline ------------------------------------------------------------------------------------


def light_control(pipe: Any) -> LightControl | None:
    """The pipeline's light control encoder, if it has one."""
    control = getattr(pipe, CONTROL_COMPONENT, None)
    return control if isinstance(control, LightControl) else None


def add_light_control(
    pipe: Any, config: LightControlConfig | None = None, block_out_channels: tuple[int, ...] | None = None,
    seed: int | None = 0,
) -> LightControl:  # fmt: skip
    """A fresh light control encoder on ``pipe.unet`` (``pipe.control_encoder``), zero output at first.

    ``config`` defaults to one fitting the UNet (``block_out_channels`` as given, else the stock four
    widths). The encoder is initialised from ``seed`` (``None``: the global RNG), on the UNet's device.
    """
    if light_control(pipe) is not None:
        raise ValueError("the pipeline already has a light control encoder; remove_light_control(pipe) first")
    unet = pipe.unet
    if config is None:
        kwargs = {"block_out_channels": tuple(block_out_channels)} if block_out_channels else {}
        config = LightControlConfig(unet.conv_in.out_channels, **kwargs)
    if seed is None:
        control = LightControl(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            control = LightControl(config)
    control.to(device=unet.conv_in.weight.device).eval()
    control.attach(unet)
    setattr(pipe, CONTROL_COMPONENT, control)
    return control


def remove_light_control(pipe: Any) -> None:
    """Detach and drop the pipeline's light control encoder (no-op without one)."""
    control = light_control(pipe)
    if control is not None:
        control.detach()
        delattr(pipe, CONTROL_COMPONENT)


# --- the encoder alone, merged -------------------------------------------------------------------------

LIGHT_CONTROL_CONFIG_NAME = "config.json"
LIGHT_CONTROL_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_LIGHT_CONTROL_CLASS = "LightControl"


def save_light_control(control: LightControl, folder: str | Path, replace: bool = False) -> Path:
    """Write the encoder in effect, with no adapter around it, as a folder: ``config.json`` (its
    :class:`LightControlConfig`) and ``diffusion_pytorch_model.safetensors`` (the stock
    ``ControlNetConditioningEmbedding`` keys). An encoder trained as an adapter's ``modules_to_save``
    is written as its trained copy. The folder appears whole or not at all; an existing one is
    refused unless ``replace``. :func:`load_light_control` reads it back onto any pipeline.
    """
    from safetensors.torch import save_file

    from .atomic import staged_dir
    from .inject import remove_boft

    shell = remove_boft(nn.ModuleDict({"encoder": copy.deepcopy(control.encoder)}), keep_merged=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in shell["encoder"].state_dict().items()}
    config = {"_class_name": _LIGHT_CONTROL_CLASS, **control.config.to_dict()}
    with staged_dir(folder, replace=replace) as tmp:
        (tmp / LIGHT_CONTROL_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / LIGHT_CONTROL_WEIGHTS_NAME), metadata={"format": "pt"})
    return Path(folder)


def load_light_control(pipe: Any, folder: str | Path) -> LightControl:
    """Attach the encoder :func:`save_light_control` wrote in ``folder`` to ``pipe`` (``pipe.control_encoder``).

    Reads these two files only, safetensors only (no code runs). The widths ``config.json`` claims are
    checked against the weights' shapes before the encoder is built (:func:`claim_problem`), so a claim
    of any size costs no memory. A missing or malformed folder, weights that do not match the config, or
    a UNet whose ``conv_in`` width differs is a ``ValueError`` naming the folder; the pipeline is left as
    it was.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / LIGHT_CONTROL_CONFIG_NAME, folder / LIGHT_CONTROL_WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(
            f"{folder} is not a light control encoder folder (it needs {LIGHT_CONTROL_CONFIG_NAME} and "
            f"{LIGHT_CONTROL_WEIGHTS_NAME}, as save_light_control writes them)"
        )
    try:
        raw = json.loads(config_path.read_text())
        if not isinstance(raw, dict) or raw.pop("_class_name", None) != _LIGHT_CONTROL_CLASS:
            raise ValueError(f"its _class_name is not {_LIGHT_CONTROL_CLASS!r}")
        config = LightControlConfig.from_dict(raw)
        tensors = load_file(str(weights_path))
        problem = claim_problem(
            f"{LIGHT_CONTROL_CONFIG_NAME} claims an encoder", config.block_out_channels,
            config.shapes, {k: tuple(t.shape) for k, t in tensors.items()},
        )  # fmt: skip
        if problem:
            raise ValueError(problem)
        control = LightControl(config)
        control.encoder.load_state_dict(tensors, strict=True)
    except (ValueError, TypeError, RecursionError, RuntimeError, OSError, SafetensorError) as err:
        raise ValueError(f"{folder}: invalid light control encoder ({str(err).splitlines()[0]})") from None
    if light_control(pipe) is not None:
        raise ValueError("the pipeline already has a light control encoder; remove_light_control(pipe) first")
    unet = pipe.unet
    control.to(device=unet.conv_in.weight.device).eval()  # float32: its features are cast to the UNet's dtype
    try:
        control.attach(unet)
    except ValueError as err:
        raise ValueError(f"{folder}: {err}") from None
    setattr(pipe, CONTROL_COMPONENT, control)
    return control


# --- conditioned sampling -------------------------------------------------------------------------------


def control_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    """Control images as a ``(B, 3, size, size)`` float batch in [0, 1] (RGB, resized bilinearly)."""
    arrays = [np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR)) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0)


def controlnet_pipeline(pipe: Any, controlnet: nn.Module | None = None) -> Any:
    """The stock ControlNet pipeline of ``pipe``'s family sharing its modules (nothing copied): the family's
    ``controlnet_pipeline`` class (``StableDiffusionControlNetPipeline`` for SD 1.x/2.x,
    ``StableDiffusionXLControlNetPipeline`` for SDXL) built with its ``pipeline_options``.

    ``controlnet`` defaults to ``pipe.controlnet``; ``pipe`` may already be such a pipeline.
    """
    from .families import FAMILIES, family_of

    controlnet = controlnet if controlnet is not None else getattr(pipe, "controlnet", None)
    if controlnet is None:
        raise ValueError("the pipeline has no ControlNet: pass one or train with control.mode=controlnet")
    family = family_of(pipe)
    kind = family.controlnet_pipeline_class()
    if kind is None:
        supported = [f.name for f in FAMILIES.values() if f.controlnet_pipeline is not None]
        raise ValueError(
            f"ControlNet sampling supports {' and '.join(supported)} pipelines, not {family.title}"
        )
    if isinstance(pipe, kind) and pipe.controlnet is controlnet:
        return pipe
    modules = {
        name: getattr(pipe, name) for name in ("vae", family.denoiser, "scheduler", *family.text_encoders)
    }
    modules |= family.tokenizers(pipe)
    wrapped = kind(**modules, controlnet=controlnet, **family.pipeline_options)
    wrapped.set_progress_bar_config(disable=True)
    return wrapped


@torch.no_grad()
def sample_with_control(
    pipe: Any,
    prompts: list[str],
    conditions: list[Image.Image],
    seeds: list[int],
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    conditioning_scale: float = 1.0,
    resolution: int | None = None,
) -> list[Image.Image]:
    """One image per ``(prompt, control image, seed)``, through whichever control the pipeline has.

    A light control encoder (:func:`light_control`) samples with the stock pipeline under
    :meth:`LightControl.conditioned`; a ControlNet (``pipe.controlnet``) through the stock
    ``StableDiffusionControlNetPipeline``. Image ``i`` starts from seed ``seeds[i]``
    (:func:`~boft_diffusion.sampling.seeded_images`).
    """
    if not (len(prompts) == len(conditions) == len(seeds)) or not prompts:
        raise ValueError(
            f"give one control image and one seed per prompt (got {len(prompts)} prompts, "
            f"{len(conditions)} control images, {len(seeds)} seeds)"
        )
    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    common = dict(
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=size, width=size,
        output_type="pil",
    )  # fmt: skip
    control = light_control(pipe)
    if control is not None:
        condition = control_tensor(conditions, size)
        with control.conditioned(condition):
            return seeded_images(pipe, prompts, seeds, **common)
    if getattr(pipe, "controlnet", None) is None:
        raise ValueError(
            "this pipeline has no control (no light control encoder, no ControlNet): load an adapter trained "
            "with `boft-diffusion train controlnet`, or sample without a control image"
        )
    images = [c.convert("RGB").resize((size, size), Image.BILINEAR) for c in conditions]
    with residuals_in(pipe.controlnet, pipe.unet.dtype):
        return seeded_images(
            controlnet_pipeline(pipe), prompts, seeds, **common, image=images,
            controlnet_conditioning_scale=conditioning_scale,
        )  # fmt: skip


@contextmanager
def residuals_in(controlnet: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Cast the ControlNet's residuals to the UNet's ``dtype`` inside the block.

    A ControlNet trained with float32 parts next to a bf16 / fp16 UNet returns float32 residuals; the
    stock pipeline adds them to the UNet's features unchanged, which promotes those to float32 ahead of
    the UNet's half-precision norms (diffusers' own training script casts them the same way).
    """

    def cast(module: nn.Module, args: Any, output: Any) -> Any:
        down, mid = output[0], output[1]
        return ([d.to(dtype) for d in down], mid.to(dtype), *output[2:])

    handle = controlnet.register_forward_hook(cast)
    try:
        yield
    finally:
        handle.remove()


# --- what an adapter file records about its control -------------------------------------------------------

CONTROL_METADATA = "control"
"""Adapter metadata key: JSON ``{"mode": "light" | "controlnet", ...}``. For a ControlNet: ``"controlnet"``,
``"from_unet"`` or the folder / hub id the training run loaded it from (a hint for messages, never opened);
its ``"conditioning_embedding_out_channels"`` and the ``"seed"`` of its initialisation (what a ``from_unet``
ControlNet is rebuilt from); ``"conditioning_scale"``; and its :func:`controlnet_fingerprints`."""
LIGHT_CONTROL_METADATA = "light_control"
"""Adapter metadata key of the light control encoder's :class:`LightControlConfig` (JSON)."""
CONTROLNET_FINGERPRINTS = ("controlnet_fingerprint", "controlnet_fingerprint_float16")
"""Keys of :data:`CONTROL_METADATA` holding the ControlNet's fingerprint as loaded, and cast to float16."""

Shape = tuple[int, ...]


def condition_embedding_shapes(
    embedding_channels: int, conditioning_channels: int, widths: Sequence[int]
) -> dict[str, Shape]:
    """``{state-dict key: shape}`` of ``ControlNetConditioningEmbedding(embedding_channels,
    conditioning_channels, widths)`` (the light encoder, a ControlNet's condition embedding), built on the
    meta device: nothing is allocated, whatever the widths."""
    with torch.device("meta"):
        shell = ControlNetConditioningEmbedding(embedding_channels, conditioning_channels, tuple(widths))
    return {key: tuple(tensor.shape) for key, tensor in shell.state_dict().items()}


def claim_problem(
    what: str, widths: Sequence[int], shapes: Callable[[], Mapping[str, Shape]], found: Mapping[str, Shape]
) -> str | None:
    """Why a module whose sizes a file's metadata claims does not match the file's tensors, or ``None``.

    ``widths``: the claimed widths; ``shapes()``: the module's ``{key: shape}`` (built on the meta device);
    ``found``: the file's ``{key: shape}``. Every key must be in ``found`` with that shape. A claim of more
    widths than the file has tensors is refused before ``shapes()`` runs, so no claim, however wide or
    long, costs memory. ``what`` starts the message (``"its metadata claims an encoder"``).
    """
    if len(widths) > len(found):
        return f"{what} of {len(widths)} widths; the file holds {len(found)} tensors for it"
    for key, shape in shapes().items():
        have = found.get(key)
        if have != shape:
            return f"{what} whose {key} has shape {shape}; the file's {key} is {'missing' if have is None else have}"
    return None


def controlnet_fingerprints(controlnet: nn.Module, trained_in_full: Iterable[str] = ()) -> dict[str, str]:
    """The fingerprints of a ControlNet's weights (:func:`~boft_diffusion.pipeline.base_fingerprint` of
    ``{"controlnet": ...}``), as loaded and cast to float16, under the keys :data:`CONTROLNET_FINGERPRINTS`.

    Its top-level submodules that lie wholly inside ``trained_in_full`` (module paths: an adapter's
    ``modules_to_save``, which the adapter brings its own copies of) are left out, so the fingerprint is
    that of what the adapter builds on: the same for the ControlNet a run started from, for one that
    already holds other adapters, and for a ``from_unet`` ControlNet whichever seed made its fresh parts.
    The float16 one is what a float16 load of a float32 ControlNet gives; a ControlNet matches a recorded
    pair when the two pairs share a value.
    """
    saved = tuple(trained_in_full)

    def replaced(name: str, child: nn.Module) -> bool:
        keys = [f"{name}.{key}" for key, _ in child.named_parameters()]
        return name in saved or bool(keys) and all(any(k.startswith(s + ".") for s in saved) for k in keys)

    kept = {"controlnet": nn.ModuleDict({n: c for n, c in controlnet.named_children() if not replaced(n, c)})}
    return {
        CONTROLNET_FINGERPRINTS[0]: base_fingerprint(kept),
        CONTROLNET_FINGERPRINTS[1]: base_fingerprint(kept, as_dtype=torch.float16),
    }


def controlnet_from_unet(unet: nn.Module, widths: Sequence[int], seed: int = 0) -> nn.Module:
    """``ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths)``, its fresh parts (the
    condition embedding, zero convolutions) initialised from ``seed``, on the UNet's device, in eval mode.

    Opens no file: everything but the fresh parts is the UNet's. ``widths`` sizes the condition embedding:
    check what a file claims first (:func:`claim_problem`, :func:`condition_embedding_shapes`).
    """
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(widths))
    return controlnet.to(device=unet.conv_in.weight.device).eval()  # from_unet builds in training mode
