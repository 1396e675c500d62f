"""``boft-diffusion train <recipe>``: train a BOFT adapter with a recipe of :mod:`boft_diffusion.recipes`.

The config is the recipe's typed dataclass: its defaults (the embedded tiny job), then ``--config``
(a YAML file), then ``section.key=value`` overrides; an unknown key or a bad value is one ``error:``
line. ``--help`` of a recipe lists every key with its default and documentation.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from . import Command, OneLineErrorParser, add_example, reports_input_errors

HELP = "train a BOFT adapter with a recipe"
EXAMPLE = """examples:
  boft-diffusion train dreambooth                                    # the embedded tiny job, offline
  boft-diffusion train dreambooth --config configs/dreambooth/sd15.yaml optim.learning_rate=1e-4
  boft-diffusion train dreambooth --help                             # every key, its default and meaning"""


def keys_help(recipe_name: str) -> str:
    """Every config key of a recipe with its default and documentation (for ``--help``)."""
    from ..recipes import get_recipe
    from ..training.args import field_docs

    config_class = get_recipe(recipe_name).load().CONFIG_CLASS
    lines = ["config keys (section.key=value on the command line, or in the YAML file):"]
    for key, (doc, default) in field_docs(config_class).items():
        lines.append(f"  {key} = {default!r}")
        lines += textwrap.wrap(doc, 96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


class RecipeParser(OneLineErrorParser):
    """Builds the key listing of its recipe only when help is shown (it imports the recipe)."""

    def __init__(self, *args: Any, recipe_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recipe_name = recipe_name

    def format_help(self) -> str:
        if self.recipe_name and not self.epilog:
            self.epilog = keys_help(self.recipe_name)
        return super().format_help()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..recipes import RECIPES

    add_example(parser, EXAMPLE)
    recipes = parser.add_subparsers(dest="recipe", metavar="RECIPE", required=True, parser_class=RecipeParser)
    for name, recipe in RECIPES.items():
        sub = recipes.add_parser(
            name,
            help=recipe.summary,
            description=f"{recipe.summary}\nDefaults: the embedded tiny job (runs offline on CPU).",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            recipe_name=name,
        )
        sub.add_argument("--config", help="YAML config file (see configs/); defaults apply without one")
        sub.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        sub.add_argument(
            "overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. optim.learning_rate=1e-4"
        )


@reports_input_errors
def run(args: argparse.Namespace) -> int:
    from ..recipes import get_recipe
    from ..training.args import config_to_yaml, load_config

    module = get_recipe(args.recipe).load()
    config = load_config(module.CONFIG_CLASS, args.config, args.overrides)
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    result = module.run(config)
    if result.losses:
        print(
            f"Trained {result.global_step} steps; loss {result.losses[0]:.4f} (first) -> "
            f"{result.losses[-1]:.4f} (last); adapter: {result.output_dir}"
        )
    return 0


COMMAND = Command(HELP, add_arguments, run)
