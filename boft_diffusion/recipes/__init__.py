"""Training recipes, one module per task: each a short ``setup -> train -> save`` over
:mod:`boft_diffusion.training`.

A recipe module exposes ``CONFIG_CLASS`` (its typed config dataclass; its defaults are a job
that runs offline on the embedded tiny pipeline) and ``run(config) -> result``. Register it in
:data:`RECIPES` to get ``boft-diffusion train <name>``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

__all__ = ["RECIPES", "Recipe", "get_recipe"]


@dataclass(frozen=True)
class Recipe:
    name: str
    module: str
    summary: str

    def load(self) -> ModuleType:
        """Import the recipe module (lazily: it pulls in torch and diffusers)."""
        return importlib.import_module(self.module)


RECIPES: dict[str, Recipe] = {
    "dreambooth": Recipe(
        "dreambooth",
        "boft_diffusion.recipes.dreambooth",
        "Teach a Stable Diffusion model a subject from a few photos (DreamBooth, optional prior preservation).",
    ),
    "pivotal": Recipe(
        "pivotal",
        "boft_diffusion.recipes.pivotal",
        "DreamBooth whose subject is named by new tokens trained with the adapter (pivotal tuning: textual inversion + BOFT).",
    ),
    "controlnet": Recipe(
        "controlnet",
        "boft_diffusion.recipes.controlnet",
        "Make a Stable Diffusion model follow a control image (light encoder or a stock ControlNet, BOFT on attention).",
    ),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise KeyError(f"Unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    return RECIPES[name]
