"""Merged checkpoints: a stock diffusers folder, or one ``.safetensors`` file in the original SD / SDXL / FLUX.1
layout.

``export_merged`` folds the active BOFT adapters (with their strengths) into the weights and writes a
checkpoint that opens with no project code:

- ``format="diffusers"``: the family's stock pipeline class opens it with ``from_pretrained(out_dir)``
  (every family: SD, SDXL, SD3, Flux, Flux.2; safetensors; with ``dtype`` the weights are cast, with ``variant`` the
  files are named ``*.<variant>.safetensors``).
- ``format="single_file"``: one file with the original Stable Diffusion keys (``model.diffusion_model.*``,
  ``first_stage_model.*``, and the text encoder as ``cond_stage_model.transformer.text_model.*`` for SD 1.x's
  CLIP or ``cond_stage_model.model.*`` in OpenCLIP form, q/k/v fused, for SD 2.x) that ComfyUI, AUTOMATIC1111 and
  ``StableDiffusionPipeline.from_single_file(path, config=<diffusers folder of the base>)`` read; for SDXL
  the sgm layout (``conditioner.embedders.0.transformer.*``, ``conditioner.embedders.1.model.*`` in
  OpenCLIP form, ``label_emb``) that ``StableDiffusionXLPipeline.from_single_file`` reads; for FLUX.1 BFL's
  transformer-only file. The layout is the family's (``Family.single_file``, key maps in
  :mod:`boft_diffusion.families.keys`); this package merges and writes.

The caller's pipeline is never modified (nor its modules' train/eval mode): merged weights
``W' = (W M^T) ⊙ s`` and biases are computed per layer into new tensors, deterministically (dropout is
training-only), and every other tensor is shared, not copied. A non-finite merged tensor is refused.
Provenance (base model, adapters and strengths) goes into the safetensors metadata and, for folders,
``boft_provenance.json``. Output is written beside ``out_dir`` under a temporary name and renamed into
place: an error leaves nothing behind.

One module per concern:

- :mod:`.merged`      merged weights, computed without touching the pipeline
- :mod:`.provenance`  what an export holds (metadata and ``boft_provenance.json``)
- :mod:`.write`       the two output formats and ``export_merged``
"""

from ..families.keys import to_original_layout
from .merged import merged_state_dict
from .provenance import PROVENANCE_NAME, provenance
from .write import SINGLE_FILE_NAME, export_merged, parse_dtype

__all__ = [
    "PROVENANCE_NAME",
    "SINGLE_FILE_NAME",
    "export_merged",
    "merged_state_dict",
    "parse_dtype",
    "provenance",
    "to_original_layout",
]
