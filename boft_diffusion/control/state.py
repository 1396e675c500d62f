"""What an adapter file records about its control, and the two kinds of trained state that bring a control
on loading (:mod:`boft_diffusion.trained_state`).

- ``light_control``: an adapter trained with a light control encoder holds the encoder's weights as the
  BOFT ``modules_to_save`` of the component ``control_encoder``; this kind brings that component. Saving
  records the encoder's :class:`~boft_diffusion.control.encoder.LightControlConfig`; loading onto a
  pipeline without an encoder builds it from that record, once the widths it claims are those of the
  file's own tensors (checked on the meta device), and attaches it to the UNet.
- ``controlnet``: an adapter with ControlNet weights loads onto the ControlNet the caller gives
  (``load_boft_weights(..., controlnet=...)``) or ``pipe.controlnet``, whose fingerprint must be the one
  the file records; a ``from_unet`` adapter without one gets it rebuilt from ``pipe.unet``. Any other
  ControlNet the file names is named in the message, never opened.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..inject import AdapterPlan
from ..io.format import AdapterFile, AdapterFormatError
from ..pipeline import base_fingerprint, pipeline_components
from ..trained_state import Attachment, SavedState, TrainedState, register_trained_state
from .encoder import (
    CONTROL_COMPONENT,
    LightControl,
    LightControlConfig,
    claim_problem,
    condition_embedding_shapes,
    light_control,
    remove_light_control,
)

__all__ = [
    "CONTROL_METADATA",
    "CONTROLNET_FINGERPRINTS",
    "CONTROLNET_STATE",
    "LIGHT_CONTROL_METADATA",
    "LIGHT_CONTROL_STATE",
    "check_control_claims",
    "control_metadata",
    "controlnet_fingerprints",
    "controlnet_from_unet",
]

CONTROL_METADATA = "control"
"""Adapter metadata key: JSON ``{"mode": "light" | "controlnet", ...}``. For a ControlNet: ``"controlnet"``,
``"from_unet"`` or the folder / hub id the training run loaded it from (a hint for messages, never opened);
its ``"conditioning_embedding_out_channels"`` and the ``"seed"`` of its initialisation (what a ``from_unet``
ControlNet is rebuilt from); ``"conditioning_scale"``; and its :func:`controlnet_fingerprints`."""
LIGHT_CONTROL_METADATA = "light_control"
"""Adapter metadata key of the light control encoder's :class:`LightControlConfig` (JSON)."""
CONTROLNET_FINGERPRINTS = ("controlnet_fingerprint", "controlnet_fingerprint_float16")
"""Keys of :data:`CONTROL_METADATA` holding the ControlNet's fingerprint as loaded, and cast to float16."""


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


# --- what the metadata says about the control, checked against the file ---------------------------------
def control_metadata(metadata: Mapping[str, str], source: str) -> dict[str, Any] | None:
    """What an adapter's ``metadata`` records about its control (``None``: nothing), parsed and checked for
    type; nothing is built or opened. Light: ``{"mode": "light", ..., "encoder": LightControlConfig}``.
    ControlNet: the JSON object of :data:`~boft_diffusion.control.CONTROL_METADATA`, with ``"controlnet"`` a
    string (``"from_unet"`` or where the training run loaded it: a hint), ``"seed"`` an integer in
    ``[0, 2**63)``, any ``"conditioning_embedding_out_channels"`` positive integers, any
    ``"conditioning_scale"`` a finite number and any fingerprints strings. Raises
    :class:`AdapterFormatError` naming ``source``."""
    if CONTROL_METADATA not in metadata and LIGHT_CONTROL_METADATA not in metadata:
        return None
    try:
        info = json.loads(metadata.get(CONTROL_METADATA, '{"mode": "light"}'))
        if not isinstance(info, dict) or info.get("mode") not in ("light", "controlnet"):
            raise ValueError(f"{CONTROL_METADATA!r} must be an object with mode light or controlnet")
        return _light_record(info, metadata) if info["mode"] == "light" else _controlnet_record(info)
    except (ValueError, TypeError, RecursionError) as err:
        message = " ".join(str(err).split())[:300]
        raise AdapterFormatError(f"{source}: invalid control metadata ({message})") from None


def _light_record(info: dict[str, Any], metadata: Mapping[str, str]) -> dict[str, Any]:
    raw = metadata.get(LIGHT_CONTROL_METADATA)
    if raw is None:
        raise ValueError(f"no {LIGHT_CONTROL_METADATA!r} metadata describes its encoder")
    return {**info, "encoder": LightControlConfig.from_dict(json.loads(raw))}


def _controlnet_record(info: dict[str, Any]) -> dict[str, Any]:
    info = {"controlnet": "from_unet", "seed": 0, **info}
    widths = info.get("conditioning_embedding_out_channels")
    seed = info["seed"]
    if not isinstance(info["controlnet"], str):
        raise ValueError(f"its controlnet must be a string, got {type(info['controlnet']).__name__}")
    if widths is not None and not (isinstance(widths, list) and widths and all(_positive(w) for w in widths)):
        raise ValueError(
            f"conditioning_embedding_out_channels must be a list of positive integers, got {widths!r}"
        )
    if not (_positive(seed) or seed == 0) or seed >= 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    scale = info.get("conditioning_scale", 1.0)
    if not isinstance(scale, int | float) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"conditioning_scale must be a finite number, got {scale!r}")
    if not all(isinstance(info.get(key, ""), str) for key in CONTROLNET_FINGERPRINTS):
        raise ValueError(f"{' and '.join(CONTROLNET_FINGERPRINTS)} must be strings")
    return info


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _shapes(adapter: AdapterFile, comp: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """``{key after prefix: shape}`` of the file's ``comp`` tensors under ``prefix``."""
    tensors = adapter.tensors.get(comp, {})
    return {k[len(prefix) :]: tuple(t.shape) for k, t in tensors.items() if k.startswith(prefix)}


def check_control_claims(
    adapter: AdapterFile, info: Mapping[str, Any] | None, embedding_channels: int | None = None
) -> None:
    """Every size the control metadata ``info`` (:func:`control_metadata`) claims must be that of the file's
    own tensors; checked on the meta device (:func:`~boft_diffusion.control.claim_problem`), nothing built.

    The light encoder against the file's ``control_encoder`` tensors; the condition embedding of a
    ``from_unet`` ControlNet against its ``controlnet_cond_embedding`` tensors, for a UNet whose first width
    is ``embedding_channels`` (default: the file's). Components the file does not hold are not checked.
    Raises :class:`AdapterFormatError` naming the file, the claimed shape and the file's.
    """
    mode = info["mode"] if info else None
    problem = None
    if mode == "light" and CONTROL_COMPONENT in adapter.configs:
        problem = _light_claim(adapter, info["encoder"])
    elif mode == "controlnet" and info["controlnet"] == "from_unet" and "controlnet" in adapter.configs:
        problem = _embedding_claim(
            adapter, info.get("conditioning_embedding_out_channels"), embedding_channels
        )
    if problem:
        raise AdapterFormatError(f"{adapter.source}: {problem}")


def _light_claim(adapter: AdapterFile, config: LightControlConfig) -> str | None:
    return claim_problem(
        f"its {LIGHT_CONTROL_METADATA} metadata claims an encoder",
        config.block_out_channels,
        lambda: {f"encoder.{key}": shape for key, shape in config.shapes().items()},
        _shapes(adapter, CONTROL_COMPONENT),
    )


def _embedding_claim(
    adapter: AdapterFile, widths: list[int] | None, embedding_channels: int | None
) -> str | None:
    if widths is None:
        return None  # nothing claimed (and nothing to rebuild from)
    found = _shapes(adapter, "controlnet", "controlnet_cond_embedding.")
    out = embedding_channels or found.get("conv_out.weight", (1,))[0]
    return claim_problem(
        f"its {CONTROL_METADATA} metadata claims a ControlNet condition embedding",
        widths,
        lambda: condition_embedding_shapes(out, 3, widths),
        found,
    )


# --- the control modules an adapter loads onto ------------------------------------------------------------
def _new_light_control(pipe: Any, adapter: AdapterFile) -> LightControl | None:
    """The light control encoder ``adapter`` needs and ``pipe`` lacks (not attached yet), else ``None``:
    built from the file's metadata once its claimed sizes are checked against the file's tensors."""
    if CONTROL_COMPONENT not in adapter.configs or light_control(pipe) is not None:
        return None
    info = control_metadata(adapter.metadata, adapter.source)
    if info is None or info["mode"] != "light":
        raise AdapterFormatError(
            f"{adapter.source}: invalid control metadata (no {LIGHT_CONTROL_METADATA!r} metadata describes "
            "its encoder)"
        )
    config: LightControlConfig = info["encoder"]
    unet = getattr(pipe, "unet", None)
    width = getattr(getattr(unet, "conv_in", None), "out_channels", None)
    if width != config.embedding_channels:
        raise AdapterFormatError(
            f"{adapter.source}: its light control encoder feeds {config.embedding_channels} channels, the "
            f"pipeline's UNet conv_in has {width}: the adapter was trained for another model"
        )
    check_control_claims(adapter, info)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the untrained original (zero output); the trained copy comes from the file
        control = LightControl(config)
    return control.to(device=unet.conv_in.weight.device).eval()


def _controlnet(pipe: Any, adapter: AdapterFile, given: torch.nn.Module | None) -> tuple[Any, str]:
    """The ControlNet ``adapter`` loads onto and where it comes from: ``"given"`` (``controlnet=``, not on
    ``pipe`` yet), ``"pipeline"`` (``pipe.controlnet``) or ``"rebuilt"`` (from ``pipe.unet``, for a
    ``from_unet`` adapter, its claimed widths checked first). ``(None, "pipeline")`` for an adapter
    without ControlNet weights. Nothing the file records is opened."""
    if "controlnet" not in adapter.configs:
        return None, "pipeline"
    current = pipeline_components(pipe).get("controlnet")
    if given is not None and current is not None and given is not current:
        raise ValueError(
            "the pipeline already has a ControlNet (pipe.controlnet) and another was passed as controlnet=; "
            "pass it to a pipeline without one"
        )
    if current is not None:
        return current, "pipeline"
    if given is not None:
        return given, "given"
    info = control_metadata(adapter.metadata, adapter.source) or {"mode": None}
    if info["mode"] != "controlnet" or info["controlnet"] != "from_unet":
        raise AdapterFormatError(f"{adapter.source}: {_name_the_controlnet(info)}")
    return _rebuilt_controlnet(pipe, adapter, info), "rebuilt"


_GIVE_THE_CONTROLNET = (
    "load it yourself and pass it: load_boft_weights(pipe, path, controlnet=ControlNetModel.from_pretrained(...)), "
    "or set pipe.controlnet; or `boft-diffusion sample --controlnet PATH`"
)


def _name_the_controlnet(info: Mapping[str, Any]) -> str:
    """The message for an adapter whose ControlNet the caller did not give: what the file records, as a hint."""
    if info.get("mode") != "controlnet":
        return f"the adapter holds ControlNet weights and records no ControlNet; {_GIVE_THE_CONTROLNET}"
    source = info["controlnet"]
    hint = repr(source) if len(source) <= 200 else repr(source[:197] + "...")
    fingerprint = info.get(CONTROLNET_FINGERPRINTS[0]) or "not recorded"
    return (
        f"the adapter was trained on the ControlNet {hint} (fingerprint {fingerprint}); an adapter file never "
        f"chooses what is loaded, so that is not opened: {_GIVE_THE_CONTROLNET}"
    )


def _rebuilt_controlnet(pipe: Any, adapter: AdapterFile, info: Mapping[str, Any]) -> torch.nn.Module:
    """A ``from_unet`` adapter's ControlNet, rebuilt from the pipeline's UNet once the file's tensors have
    the widths its metadata claims."""
    unet = pipeline_components(pipe).get("unet")
    widths = info.get("conditioning_embedding_out_channels")
    if unet is None or widths is None:
        missing = "the pipeline has no UNet" if unet is None else "no conditioning_embedding_out_channels"
        raise AdapterFormatError(
            f"{adapter.source}: cannot rebuild its from_unet ControlNet ({missing}); {_GIVE_THE_CONTROLNET}"
        )
    check_control_claims(adapter, info, embedding_channels=unet.config.block_out_channels[0])
    return controlnet_from_unet(unet, widths, info["seed"])


def _check_controlnet_fingerprint(adapter: AdapterFile, controlnet: Any, plan: AdapterPlan, how: str) -> None:
    """The fingerprint ``adapter`` records must be ``controlnet``'s (modules the adapter trains in full left
    out); a file recording none passes, with a warning unless the ControlNet was rebuilt as it records."""
    info = control_metadata(adapter.metadata, adapter.source) or {}
    recorded = [info[key] for key in CONTROLNET_FINGERPRINTS if info.get(key)]
    if not recorded:
        if how != "rebuilt":
            warnings.warn(
                f"{adapter.source} records no ControlNet fingerprint (written before they were recorded): "
                "cannot check that the ControlNet it loads onto is the one it was trained on",
                stacklevel=3,
            )
        return
    ours = controlnet_fingerprints(controlnet, plan.saved)
    if set(recorded).isdisjoint(ours.values()):
        which = {
            "rebuilt": "the ControlNet rebuilt from this pipeline's UNet",
            "given": "the ControlNet given",
        }
        raise AdapterFormatError(
            f"{adapter.source}: the adapter was trained on a ControlNet with fingerprint {recorded[0]}; "
            f"{which.get(how, 'pipe.controlnet')} has fingerprint {ours[CONTROLNET_FINGERPRINTS[0]]}: give the "
            "ControlNet it was trained on"
        )


# --- the two kinds ------------------------------------------------------------------------------------------
class LightControlState(TrainedState):
    """The light control encoder: its weights are the BOFT ``modules_to_save`` of ``control_encoder``; this kind
    records its config on saving and builds and attaches the encoder on loading."""

    name = "light_control"
    components = (CONTROL_COMPONENT,)

    def carried_by(self, adapter: AdapterFile) -> bool:
        return CONTROL_COMPONENT in adapter.configs

    def collect(self, pipe: Any, adapter_name: str, configs: Mapping[str, Any]) -> SavedState | None:
        control = pipeline_components(pipe).get(CONTROL_COMPONENT)
        if not isinstance(control, LightControl) or CONTROL_COMPONENT not in configs:
            return None
        return SavedState(
            metadata={LIGHT_CONTROL_METADATA: json.dumps(control.config.to_dict(), sort_keys=True)}
        )

    def prepare(
        self, pipe: Any, adapter: AdapterFile, adapter_name: str, options: Mapping[str, Any]
    ) -> Attachment | None:
        control = _new_light_control(pipe, adapter)
        if control is None:
            return None

        def attach() -> None:
            control.attach(pipe.unet)
            setattr(pipe, CONTROL_COMPONENT, control)

        return Attachment(attach, lambda: remove_light_control(pipe), {CONTROL_COMPONENT: control})


class ControlNetState(TrainedState):
    """A ControlNet an adapter adapts: the one given (``options["controlnet"]``), ``pipe.controlnet``, or one
    rebuilt from the UNet for a ``from_unet`` adapter; its fingerprint checked against the file's record."""

    name = "controlnet"

    def carried_by(self, adapter: AdapterFile) -> bool:
        return "controlnet" in adapter.configs

    def prepare(
        self, pipe: Any, adapter: AdapterFile, adapter_name: str, options: Mapping[str, Any]
    ) -> Attachment | None:
        net, how = _controlnet(pipe, adapter, options.get("controlnet"))
        if net is None:
            return None

        def check(plans: Mapping[str, AdapterPlan]) -> None:
            _check_controlnet_fingerprint(adapter, net, plans["controlnet"], how)

        if how == "pipeline":
            return Attachment(check=check)

        def attach() -> None:
            pipe.controlnet = net

        def detach() -> None:
            if getattr(pipe, "controlnet", None) is net:
                delattr(pipe, "controlnet")

        return Attachment(attach, detach, {"controlnet": net}, check)


LIGHT_CONTROL_STATE = register_trained_state(LightControlState())
CONTROLNET_STATE = register_trained_state(ControlNetState())
