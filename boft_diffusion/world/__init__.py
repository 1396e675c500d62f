"""The embedded world: procedural captioned scenes, their exact condition maps, and a scorer.

A scene is one simple object on a background, 64 × 64 RGB by default (any size renders)::

    shape       circle, square, triangle, star, diamond, cross, heart
    colour      red, green, blue, yellow, purple, orange, white, black       (fixed RGB, ``COLOURS``)
    size        small, large                         (radius ranges in ``SIZE_RADII``)
    position    continuous, the object kept ``MARGIN`` off the border
    background  any colour but black and the object's, plain or striped / checkered / speckled

    caption     "a photo of a small red circle on a blue background"
                "a photo of a large white star on a striped green background"

:func:`render` returns the image and the renderer's own :class:`Maps` (object ``mask``, its
``edges``, its ``box``), the condition maps a ControlNet learns from. :func:`sample_scenes` draws
scenes from a seed and leaves out ``HELD_OUT_PAIRS`` (colour, shape) so that composition can be
tested on pairs pretraining never saw. The DreamBooth subject, ``"sks toy"``, is a pink-and-teal
striped star, an object the world never contains otherwise (:func:`render_subject`), shown in
views a model can reproduce: large, on plain backgrounds (:func:`subject_scenes`).

:func:`score_image` reads an image back into a :class:`Reading` (background, texture, colour,
shape, size, mask, edges, box): this world's analogue of DINO / CLIP scores, exact on clean renders
and robust to mild noise and blur, for measuring what a finetuned pipeline learned.
"""

from .scenes import (
    ALL_PAIRS,
    BACKGROUND_COLOURS,
    CAPTION_DROP,
    COLOURS,
    HELD_OUT_PAIRS,
    MARGIN,
    SHAPES,
    SIZE_RADII,
    SIZES,
    SUBJECT_BACKGROUNDS,
    SUBJECT_COLOUR,
    SUBJECT_SHAPE,
    SUBJECT_STRIPES,
    SUBJECT_TOKEN,
    TEXTURE_SHADE,
    TEXTURES,
    Maps,
    Scene,
    caption_of,
    caption_variant,
    condition_image,
    held_out_scenes,
    mask_box,
    mask_edges,
    parse_caption,
    partial_caption,
    render,
    render_subject,
    sample_scenes,
    scene_to_pil,
    shape_extent,
    shape_mask,
    subject_scene,
    subject_scenes,
    texture_period,
)
from .scorer import (
    ATTRIBUTES,
    Reading,
    aligned_tones,
    attribute_accuracy,
    colour_distance,
    edge_f1,
    mask_iou,
    score_image,
)

__all__ = [
    "ALL_PAIRS",
    "CAPTION_DROP",
    "ATTRIBUTES",
    "BACKGROUND_COLOURS",
    "COLOURS",
    "HELD_OUT_PAIRS",
    "MARGIN",
    "SHAPES",
    "SIZES",
    "SIZE_RADII",
    "SUBJECT_BACKGROUNDS",
    "SUBJECT_COLOUR",
    "SUBJECT_SHAPE",
    "SUBJECT_STRIPES",
    "SUBJECT_TOKEN",
    "TEXTURES",
    "TEXTURE_SHADE",
    "Maps",
    "Reading",
    "Scene",
    "aligned_tones",
    "attribute_accuracy",
    "colour_distance",
    "caption_of",
    "caption_variant",
    "condition_image",
    "edge_f1",
    "held_out_scenes",
    "mask_box",
    "mask_edges",
    "parse_caption",
    "partial_caption",
    "mask_iou",
    "render",
    "render_subject",
    "sample_scenes",
    "scene_to_pil",
    "score_image",
    "shape_extent",
    "shape_mask",
    "subject_scene",
    "subject_scenes",
    "texture_period",
]
