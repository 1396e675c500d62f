"""Adapter files: the project's safetensors format, PEFT interop, one reader for any source, and
save/load on pipelines.

Modules, each importing only those before it: ``format`` (this project's file), ``peft`` (PEFT folder
<-> :class:`AdapterFile`), ``kohya_args`` (sd-scripts' ``networks.boft`` arguments, parsed and recorded as
sd-scripts reads them), ``kohya`` (kohya sd-scripts network files: ``networks.boft`` read and written
exactly, other OFT variants refused with the reason), ``read`` (:func:`read_adapter`: any source;
:func:`detect_format`: any file), ``load`` (pipelines).
"""

from .format import (
    ADAPTER_WEIGHTS_NAME,
    FORMAT_VERSION,
    AdapterFile,
    AdapterFormatError,
    read_adapter_file,
    write_adapter,
)
from .kohya import (
    KohyaNetwork,
    is_kohya_adapter,
    kohya_module_name,
    read_kohya_adapter,
    read_kohya_network,
    write_kohya_adapter,
)
from .load import get_boft_adapter, load_boft_weights, save_boft_weights, save_peft_adapter
from .peft import is_peft_adapter, read_peft_adapter, write_peft_adapter
from .read import FILE_FORMATS, DetectedFormat, adapter_from_state_dict, detect_format, read_adapter

__all__ = [
    "ADAPTER_WEIGHTS_NAME",
    "FILE_FORMATS",
    "FORMAT_VERSION",
    "AdapterFile",
    "AdapterFormatError",
    "DetectedFormat",
    "KohyaNetwork",
    "adapter_from_state_dict",
    "detect_format",
    "get_boft_adapter",
    "is_kohya_adapter",
    "is_peft_adapter",
    "kohya_module_name",
    "load_boft_weights",
    "read_adapter",
    "read_adapter_file",
    "read_kohya_adapter",
    "read_kohya_network",
    "read_peft_adapter",
    "save_boft_weights",
    "save_peft_adapter",
    "write_adapter",
    "write_kohya_adapter",
    "write_peft_adapter",
]
