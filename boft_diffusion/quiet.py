"""Known import-time warnings of optional libraries, dropped so that an error stays one line.

With the optional extras installed (the test extra installs them all), importing diffusers imports peft,
which imports bitsandbytes and torchao. On a machine without CUDA, Triton or hub access these log at
import that they cannot load kernels this package never uses (torchao's CUDA extensions, bitsandbytes'
hub kernels), torch logs a deprecation of torchao's enum registration, and diffusers that some torchao
tensor classes are missing. Each would precede every one-line error of the command line. This module
attaches a filter to exactly those loggers that drops exactly those messages (by their opening words);
every other record of theirs passes, and nothing else is touched. Imported first by the package root.
"""

from __future__ import annotations

import logging

__all__ = ["IMPORT_NOISE"]

IMPORT_NOISE: dict[str, tuple[str, ...]] = {
    "torchao": ("Failed to load ",),
    "torchao.kernel.intmm": ("Warning: Detected no triton",),
    "torch.utils._pytree": (
        "<enum ",
    ),  # "... is an Enum subclass and is now natively supported by torch.compile"
    "kernels._internals.hf_hub": ("Skipping publisher trust check",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}
"""Logger name -> the openings of the messages dropped from it."""


class _DropKnown(logging.Filter):
    def __init__(self, openings: tuple[str, ...]) -> None:
        super().__init__()
        self.openings = openings

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the library's to report
            return True
        return not message.startswith(self.openings)


for _name, _openings in IMPORT_NOISE.items():
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _DropKnown) for f in _logger.filters):
        _logger.addFilter(_DropKnown(_openings))
