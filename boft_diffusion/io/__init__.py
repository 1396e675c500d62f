"""Adapter files: the project's safetensors format, save/load on pipelines, PEFT interop."""

from .format import (
    ADAPTER_WEIGHTS_NAME,
    FORMAT_VERSION,
    AdapterFile,
    AdapterFormatError,
    read_adapter,
    write_adapter,
)
from .load import get_boft_adapter, load_boft_weights, save_boft_weights
from .peft import is_peft_adapter, read_peft_adapter, save_peft_adapter

__all__ = [
    "ADAPTER_WEIGHTS_NAME",
    "FORMAT_VERSION",
    "AdapterFile",
    "AdapterFormatError",
    "get_boft_adapter",
    "is_peft_adapter",
    "load_boft_weights",
    "read_adapter",
    "read_peft_adapter",
    "save_boft_weights",
    "save_peft_adapter",
    "write_adapter",
]
