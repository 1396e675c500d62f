"""What a recipe taught, measured as the papers measure it.

DreamBooth (Ruiz et al., CVPR 2023) scores a finetuned model by sampling prompts and comparing:

    subject_fidelity  samples of the instance prompt ("a photo of sks toy") and of every context prompt
                      against the instance images: the paper's DINO and CLIP-I, the mean cosine of
                      image embeddings over all prompts' samples (each prompt's own in ``per_prompt``)
    prompt_fidelity   samples of context prompts ("... sks toy on a striped green background") against
                      their prompts: the paper's CLIP-T, the cosine of image and text embeddings
    class_drift       samples of the class prompt ("a photo of a toy") against the instance images:
                      the paper's PRES (prior preservation); high means the subject leaked into its class

A :class:`Scorer` supplies the two comparisons. :class:`EmbeddingScorer` runs the papers' CLIP or DINO
from a local folder; :class:`WorldScorer` reads samples of the embedded world with its exact scorer
(:func:`~boft_diffusion.world.score_image`), offline and without weights: an image's likeness to the
subject is graded, as DINO's cosine is (half for its colours, by their RGB distance to the subject's,
half for reading as the subject's shape), and it obeys a prompt by the share of the prompt's
attributes it reads back. :func:`world_prompt_accuracy` asks the same of full world captions, per
attribute (GenEval-style attribute binding, read by the world scorer instead of a detector).

Controllable generation (OFT and BOFT's Canny-to-image and segmentation-to-image tasks) is scored by
control fidelity: sample each held-out condition with its prompt, detect the control signal again on the
sample with a :class:`ControlDetector`, and compare it with the condition's ground truth:

    control_edge_f1   edge_f1(detected edges, target edges), 1 px tolerance (the papers' Canny F1)
    control_mask_iou  mask_iou(detected mask, target mask) (the papers' segmentation IoU)

:func:`world_control_cases` gives held-out world scenes with the renderer's exact maps and
:class:`WorldControlDetector` reads both maps back; for a user's data, :func:`cases_from_conditions`
binarises the conditioning images and :class:`EdgeDetector` (Canny's gradient and thinning, in numpy)
finds the edges of generated images.

Sampling is deterministic: image ``i`` of every prompt starts from its own generator seeded
``seed + i``, so it does not depend on batching or on how many images are asked for.

The package: :mod:`.scorers` (the world, CLIP and DINO scorers), :mod:`.dreambooth` (the probe, seeded
samples and the DreamBooth measurements), :mod:`.control` (control fidelity) and :mod:`.grids` (grids
and tables).
"""

from __future__ import annotations

from .control import (
    CONTROL_DETECTORS,
    CONTROL_MAPS,
    CONTROL_METRICS,
    CONTROL_SEED,
    ControlCase,
    ControlDetector,
    ControlProbe,
    ControlSampler,
    EdgeDetector,
    WorldControlDetector,
    cases_from_conditions,
    load_control_detector,
    measure_control,
    world_control_cases,
)
from .dreambooth import (
    DreamBoothProbe,
    Measurement,
    measure_dreambooth,
    reconstruction_fidelity,
    sample_images,
    world_dreambooth_probe,
    world_prompt_accuracy,
)
from .grids import (
    before_after_control_rows,
    before_after_rows,
    format_metrics,
    grid,
)
from .scorers import (
    EVAL_GUIDANCE,
    EVAL_STEPS,
    GUTTER,
    CombinedScorer,
    EmbeddingScorer,
    MetricsError,
    Scorer,
    ScorerError,
    WorldScorer,
    load_scorer,
)

__all__ = [
    "CONTROL_DETECTORS",
    "CONTROL_MAPS",
    "CONTROL_METRICS",
    "CONTROL_SEED",
    "EVAL_GUIDANCE",
    "EVAL_STEPS",
    "CombinedScorer",
    "ControlCase",
    "ControlDetector",
    "ControlProbe",
    "ControlSampler",
    "DreamBoothProbe",
    "EdgeDetector",
    "EmbeddingScorer",
    "Measurement",
    "MetricsError",
    "Scorer",
    "ScorerError",
    "WorldControlDetector",
    "WorldScorer",
    "before_after_control_rows",
    "before_after_rows",
    "cases_from_conditions",
    "format_metrics",
    "grid",
    "load_control_detector",
    "load_scorer",
    "measure_control",
    "measure_dreambooth",
    "reconstruction_fidelity",
    "sample_images",
    "world_control_cases",
    "world_dreambooth_probe",
    "world_prompt_accuracy",
    "GUTTER",
]
