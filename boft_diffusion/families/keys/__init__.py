"""The original single-file key layouts of the families that have one: pure key (and shape) bookkeeping.

Each module maps a diffusers pipeline's state dicts to the one state dict of the model's original release
(the file ComfyUI, AUTOMATIC1111 and diffusers' ``from_single_file`` read), as the exact inverse of
diffusers' single-file converters, and ends in the hook its family's
:class:`~boft_diffusion.families.base.SingleFileLayout` calls (``(states, configs) -> state dict``). No file,
no pipeline, no merge: :mod:`boft_diffusion.export` merges the adapters and writes the file.

- :mod:`.sd`    Stable Diffusion 1.x / 2.x: CompVis/LDM keys, SD 2.x's text encoder in OpenCLIP form
- :mod:`.sdxl`  SDXL: Stability ``sgm`` keys
- :mod:`.flux`  FLUX.1: Black Forest Labs' transformer-only file
"""

from .flux import to_flux_original_layout
from .sd import to_original_layout
from .sdxl import to_sdxl_original_layout

__all__ = ["to_flux_original_layout", "to_original_layout", "to_sdxl_original_layout"]
