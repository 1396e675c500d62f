"""Model families: what differs between kinds of text-to-image pipeline, one module per family.

A :class:`~boft_diffusion.families.base.Family` says, for its pipelines, which components there are
and which of them BOFT targets by default, how prompts become token ids and then the denoiser's
conditioning, how the denoiser is called, what it is trained to predict, which stock pipeline
classes sample from it (with a ControlNet too, where there is one) and which optional arguments their
call takes, how its embedded tiny pipeline is built (:mod:`boft_diffusion.tiny`), and how a pipeline
becomes its original single file (the key maps in :mod:`.keys`). Recipes, training setup and arguments,
the pipeline verbs, the adapter file, export and controlled sampling ask the family (:func:`family_of`,
:func:`get_family`); nothing else branches on the kind of model. Adding a family is one module here (a
key map in :mod:`.keys` if it has a single file) and one line in :data:`FAMILIES`;
``tests/test_family_contract.py`` walks every family through every hook.
"""

from __future__ import annotations

from typing import Any

from .base import Family, SingleFileLayout, UnsupportedFamilyError
from .flux import FLUX
from .flux2 import FLUX2
from .sd import SD
from .sd3 import SD3
from .sdxl import SDXL

__all__ = [
    "FAMILIES",
    "FLUX",
    "FLUX2",
    "SD",
    "SD3",
    "SDXL",
    "Family",
    "SingleFileLayout",
    "UnsupportedFamilyError",
    "family_of",
    "get_family",
]

FAMILIES: dict[str, Family] = {family.name: family for family in (SD, SDXL, SD3, FLUX, FLUX2)}
"""Every supported family by name, in the order :func:`family_of` tries them."""


def _supported() -> str:
    return ", ".join(f"{f.name} ({f.title}: {', '.join(f.pipeline_classes)})" for f in FAMILIES.values())


def get_family(name: str) -> Family:
    """The family called ``name``; an unknown name is an :class:`UnsupportedFamilyError` listing them."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedFamilyError(f"unknown model family {name!r}; supported: {_supported()}") from None


def family_of(pipe: Any) -> Family:
    """The family of a pipeline (or of a ``{component: module}`` mapping), from its components.

    A pipeline of no supported family is an :class:`UnsupportedFamilyError` naming its class and
    listing the supported families with their pipeline classes.
    """
    for family in FAMILIES.values():
        if family.matches(pipe):
            return family
    raise UnsupportedFamilyError(
        f"{type(pipe).__name__} is not a pipeline of a supported model family; supported: {_supported()}"
    )
