"""Controllable generation: a light control encoder or a ControlNet, a package by concern.

- :mod:`.encoder`: light control, a small condition encoder whose features join the stock UNet's first
  feature map by a removable hook (the BOFT and OFT papers' control), its config, and the encoder saved
  and loaded on its own;
- :mod:`.conditioned`: sampling under control, through the stock pipeline (light) or the family's stock
  ControlNet pipeline;
- :mod:`.state`: what an adapter file records about its control, and the two kinds of trained state
  (:mod:`boft_diffusion.trained_state`) that bring a light encoder or a ControlNet when an adapter loads.
  Importing this package registers them.
"""

from .conditioned import control_tensor, controlnet_pipeline, residuals_in, sample_with_control
from .encoder import (
    CONTROL_COMPONENT,
    LightControl,
    LightControlConfig,
    add_light_control,
    claim_problem,
    condition_embedding_shapes,
    light_control,
    load_light_control,
    remove_light_control,
    save_light_control,
)
from .state import (
    CONTROL_METADATA,
    CONTROLNET_FINGERPRINTS,
    CONTROLNET_STATE,
    LIGHT_CONTROL_METADATA,
    LIGHT_CONTROL_STATE,
    check_control_claims,
    control_metadata,
    controlnet_fingerprints,
    controlnet_from_unet,
)

__all__ = [
    "CONTROLNET_FINGERPRINTS",
    "CONTROLNET_STATE",
    "CONTROL_COMPONENT",
    "CONTROL_METADATA",
    "LIGHT_CONTROL_METADATA",
    "LIGHT_CONTROL_STATE",
    "LightControl",
    "LightControlConfig",
    "add_light_control",
    "check_control_claims",
    "claim_problem",
    "condition_embedding_shapes",
    "control_metadata",
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
