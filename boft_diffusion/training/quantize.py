"""Loading a quantized base: ``model.quantization`` as diffusers' and transformers' quantization configs.

Each backend is its library's own config class (diffusers' for the denoiser, transformers' for the text
encoders), so a hub model is quantized while it loads (``DiffusionPipeline.from_pretrained(...,
quantization_config=PipelineQuantizationConfig(quant_mapping=...))``) and never sits in memory at full
precision. The embedded tiny pipeline, built in memory, goes through the same loader: each component
to quantize is written to a temporary folder and read back with its config.

Checked before anything loads (:func:`check_quantization`): the library is installed, the device can
run it (diffusers' bitsandbytes loader needs a CUDA or XPU device), the components exist in the family.
"""

from __future__ import annotations

import importlib
import importlib.util
import tempfile
from typing import Any

import torch

from .args import ConfigError, QuantizationArgs

__all__ = ["check_quantization", "component_names", "pipeline_quantization_config", "quantize_components"]

_LIBRARY = {"bnb": ("bitsandbytes", "bitsandbytes"), "torchao": ("torchao", "torchao"), "quanto": ("optimum.quanto", "optimum-quanto")}  # fmt: skip


def _gpu_for_bnb() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def component_names(quant: QuantizationArgs, family: Any) -> list[str]:
    """The pipeline attributes ``quant.components`` name for ``family`` (``denoiser``: its UNet or transformer).

    A text encoder the family does not have is a :class:`ConfigError`.
    """
    names = []
    for comp in quant.components:
        if comp == "denoiser":
            names.append(family.denoiser)
        elif comp in family.text_encoders:
            names.append(comp)
        else:
            raise ConfigError(
                f"model.quantization.components names {comp}, which {family.title} does not have "
                f"(its text encoders: {', '.join(family.text_encoders) or 'none'})"
            )
    return names


def check_quantization(quant: QuantizationArgs) -> None:
    """Refuse a backend whose library is missing or that cannot run on this machine, in one line."""
    if quant.backend == "none":
        return
    prefix = quant.backend.split("-")[0]
    module, package = _LIBRARY[prefix]
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"model.quantization.backend={quant.backend} needs {package}, which is not installed: "
            f"pip install {package} (or the extra boft-diffusion[{'bitsandbytes' if prefix == 'bnb' else prefix}])"
        )
    if prefix == "bnb" and not _gpu_for_bnb():
        raise ConfigError(
            f"model.quantization.backend={quant.backend}: diffusers' bitsandbytes loader needs a CUDA or XPU "
            "device and this machine has none; on the CPU use torchao-int8, torchao-fp8, quanto-int8 or quanto-fp8"
        )


def _config(backend: str, library: str, dtype: torch.dtype) -> Any:
    """``backend``'s quantization config of ``library`` (``diffusers`` or ``transformers``)."""
    lib = importlib.import_module(library)
    if backend == "bnb-nf4":
        return lib.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    if backend == "bnb-int8":
        return lib.BitsAndBytesConfig(load_in_8bit=True)
    if backend.startswith("torchao"):
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

        return lib.TorchAoConfig(
            Float8WeightOnlyConfig() if backend == "torchao-fp8" else Int8WeightOnlyConfig()
        )
    weights = "float8" if backend == "quanto-fp8" else "int8"
    return (
        lib.QuantoConfig(weights_dtype=weights)
        if library == "diffusers"
        else lib.QuantoConfig(weights=weights)
    )


def _library_of(name: str) -> str:
    """The library whose config a component takes: transformers for the text encoders, diffusers otherwise."""
    return "transformers" if name.startswith("text_encoder") else "diffusers"


def pipeline_quantization_config(quant: QuantizationArgs, dtype: torch.dtype) -> Any:
    """diffusers' ``PipelineQuantizationConfig`` for ``from_pretrained``: one config per component
    ``quant.components`` names (``denoiser``: ``unet`` and ``transformer``, whichever the model has), each
    of the component's library."""
    from diffusers import PipelineQuantizationConfig

    names = [n for c in quant.components for n in (("unet", "transformer") if c == "denoiser" else (c,))]
    return PipelineQuantizationConfig(
        quant_mapping={n: _config(quant.backend, _library_of(n), dtype) for n in names}
    )


def quantize_components(pipe: Any, names: list[str], quant: QuantizationArgs, dtype: torch.dtype) -> None:
    """Replace ``pipe``'s components ``names`` (built in memory) by quantized loads of the same weights."""
    for name in names:
        component = getattr(pipe, name)
        cls = type(component)
        config = _config(quant.backend, _library_of(name), dtype)
        with tempfile.TemporaryDirectory(prefix="boft-quantize-") as folder:
            component.save_pretrained(folder)
            loaded = cls.from_pretrained(folder, quantization_config=config, torch_dtype=dtype)
        pipe.register_modules(**{name: loaded.eval()})
