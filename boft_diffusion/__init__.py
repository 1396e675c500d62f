"""boft_diffusion: Orthogonal Butterfly finetuning (BOFT) for diffusers pipelines."""

# First: the known import-time warnings of optional libraries are dropped before anything imports them.
from . import quiet as _quiet  # noqa: F401  # isort: skip

# The kinds of trained state an adapter file may carry besides BOFT's (boft_diffusion.trained_state)
# register when their module is imported; importing them here means every use of the package knows them.
from . import control as _control  # noqa: F401  (light control encoder, ControlNet)
from .config import BOFTConfig
from .inject import (
    TEXT_ENCODER_TARGETS,
    UNET_ATTENTION_TARGETS,
    UNET_ATTENTION_TARGETS_WITH_ADDED_KV,
    BOFTModel,
    add_boft,
)
from .io import AdapterFormatError, load_boft_weights, save_boft_weights, save_peft_adapter
from .layers import BOFTConv2d, BOFTLinear
from .pipeline import (
    add_boft_to_pipeline,
    base_fingerprint,
    delete_boft_adapter,
    disable_boft,
    enable_boft,
    merge_boft,
    set_boft_adapters,
    unload_boft,
    unmerge_boft,
)
from .recipes import tokens as _tokens  # noqa: F401  (new token embeddings: pivotal tuning)
from .version import __version__

__all__ = [
    "__version__",
    "TEXT_ENCODER_TARGETS",
    "UNET_ATTENTION_TARGETS",
    "UNET_ATTENTION_TARGETS_WITH_ADDED_KV",
    "AdapterFormatError",
    "BOFTConfig",
    "BOFTConv2d",
    "BOFTLinear",
    "BOFTModel",
    "add_boft",
    "add_boft_to_pipeline",
    "base_fingerprint",
    "delete_boft_adapter",
    "disable_boft",
    "enable_boft",
    "load_boft_weights",
    "merge_boft",
    "save_boft_weights",
    "save_peft_adapter",
    "set_boft_adapters",
    "unload_boft",
    "unmerge_boft",
]


def __getattr__(name: str):
    # export_merged lives in a heavier module (diffusers conversion); import it on first use.
    if name == "export_merged":
        from .export import export_merged

        return export_merged
    raise AttributeError(f"module 'boft_diffusion' has no attribute {name!r}")
