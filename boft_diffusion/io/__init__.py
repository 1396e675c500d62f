"""Adapter files: the project's safetensors format, PEFT interop, one reader for any source, and
save/load on pipelines.

Modules, each importing only those before it: ``format`` (this project's file), ``peft`` (PEFT folder
<-> :class:`AdapterFile`), ``read`` (:func:`read_adapter`: any source), ``load`` (pipelines).
"""

from .format import (
    ADAPTER_WEIGHTS_NAME,
    FORMAT_VERSION,
    AdapterFile,
    AdapterFormatError,
    read_adapter_file,
    write_adapter,
)
from .load import get_boft_adapter, load_boft_weights, save_boft_weights, save_peft_adapter
from .peft import is_peft_adapter, read_peft_adapter, write_peft_adapter
from .read import adapter_from_state_dict, read_adapter

__all__ = [
    "ADAPTER_WEIGHTS_NAME",
    "FORMAT_VERSION",
    "AdapterFile",
    "AdapterFormatError",
    "adapter_from_state_dict",
    "get_boft_adapter",
    "is_peft_adapter",
    "load_boft_weights",
    "read_adapter",
    "read_adapter_file",
    "read_peft_adapter",
    "save_boft_weights",
    "save_peft_adapter",
    "write_adapter",
    "write_peft_adapter",
]
