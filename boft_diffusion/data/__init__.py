"""Training data, a package by concern: image files (:mod:`.images`), DreamBooth instance and class images
(:mod:`.dreambooth`), the dataset file naming several DreamBooth concepts (:mod:`.concepts`),
prompt-embedding files (:mod:`.embeddings`), control data (:mod:`.control`) and the embedded world's
control data (:mod:`.world`).

Images are checked when listed (a file that does not decode is skipped with a warning naming it),
loaded lazily, and turned into ``(3, R, R)`` tensors in ``[-1, 1]``: shorter side resized to ``R``,
then a center or random ``R x R`` crop and an optional horizontal flip. Random choices are a pure
function of ``(seed, epoch, index)``, so an interrupted run that resumes sees the same pixels.
"""

from __future__ import annotations

from .buckets import BucketBatchSampler, assign_buckets, auto_buckets, bucket_table, parse_bucket_sizes
from .concepts import Concept, concept_images, load_concepts
from .control import (
    ControlColumns,
    ControlDataset,
    ControlExample,
    collate_control,
    load_control_examples,
)
from .dreambooth import (
    ConceptImages,
    DreamBoothDataset,
    EpochSampler,
    collate_dreambooth,
    dreambooth_prompts,
    generate_class_images,
    tokenize_prompts,
)
from .embeddings import (
    PROMPT_EMBEDDINGS_NAME,
    load_prompt_embeddings,
    read_prompt_embeddings_metadata,
    save_prompt_embeddings,
)
from .images import (
    IMAGE_EXTENSIONS,
    DataError,
    image_and_mask_to_tensors,
    image_to_tensor,
    list_images,
    load_mask,
    load_rgb,
    read_caption,
)
from .latents import LATENT_CACHE_NAME, LatentCache, vae_fingerprint
from .world import (
    write_world_control_data,
)

__all__ = [
    "BucketBatchSampler",
    "assign_buckets",
    "auto_buckets",
    "bucket_table",
    "parse_bucket_sizes",
    "IMAGE_EXTENSIONS",
    "LATENT_CACHE_NAME",
    "PROMPT_EMBEDDINGS_NAME",
    "Concept",
    "ConceptImages",
    "ControlColumns",
    "ControlDataset",
    "ControlExample",
    "DataError",
    "DreamBoothDataset",
    "EpochSampler",
    "LatentCache",
    "collate_control",
    "concept_images",
    "collate_dreambooth",
    "generate_class_images",
    "image_and_mask_to_tensors",
    "image_to_tensor",
    "list_images",
    "load_mask",
    "load_concepts",
    "load_control_examples",
    "dreambooth_prompts",
    "load_prompt_embeddings",
    "load_rgb",
    "read_caption",
    "read_prompt_embeddings_metadata",
    "save_prompt_embeddings",
    "tokenize_prompts",
    "vae_fingerprint",
    "write_world_control_data",
]
