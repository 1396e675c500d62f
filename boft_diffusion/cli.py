"""The ``boft-diffusion`` console entry point: one subcommand per verb.

    boft-diffusion train dreambooth --config configs/dreambooth/tiny.yaml [section.key=value ...]
    boft-diffusion {sample,merge,export,inspect,bench} ...

Each subcommand is a :class:`Command` (help line, ``add_arguments(parser)``, ``run(args) -> exit
code``). ``train`` lives here; any other command ``<name>`` is the ``COMMAND`` object of the
module ``boft_diffusion.commands.<name>``, found by name. Keep heavy imports (torch, diffusers)
inside ``run`` so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["COMMAND_NAMES", "Command", "input_errors", "build_parser", "load_command", "main"]


@dataclass(frozen=True)
class Command:
    """A subcommand: ``add_arguments`` fills its parser, ``run`` executes it and returns an exit code."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMAND_NAMES = ("train", "sample", "merge", "export", "inspect", "bench")
"""Subcommands in ``--help`` order."""


def input_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input: printed as one ``error:`` line, no traceback."""
    from .data import DataError
    from .training.args import ConfigError

    errors: list[type[BaseException]] = [ConfigError, DataError]
    try:
        from .io import AdapterFormatError

        errors.append(AdapterFormatError)
    except ImportError:
        pass
    return tuple(errors)


# --- train ----------------------------------------------------------------------------------------
def _keys_help(recipe_name: str) -> str:
    """Every config key of a recipe with its default and documentation (for ``--help``)."""
    from .recipes import get_recipe
    from .training.args import field_docs

    config_class = get_recipe(recipe_name).load().CONFIG_CLASS
    lines = ["config keys (section.key=value on the command line, or in the YAML file):"]
    for key, (doc, default) in field_docs(config_class).items():
        lines.append(f"  {key} = {default!r}")
        lines += textwrap.wrap(doc, 96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


class _RecipeParser(argparse.ArgumentParser):
    """Builds the key listing of its recipe only when help is shown (it imports the recipe)."""

    def __init__(self, *args: Any, recipe_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recipe_name = recipe_name

    def format_help(self) -> str:
        if self.recipe_name and not self.epilog:
            self.epilog = _keys_help(self.recipe_name)
        return super().format_help()


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .recipes import RECIPES

    recipes = parser.add_subparsers(
        dest="recipe", metavar="RECIPE", required=True, parser_class=_RecipeParser
    )
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


def _run_train(args: argparse.Namespace) -> int:
    from .recipes import get_recipe
    from .training.args import config_to_yaml, load_config

    module = get_recipe(args.recipe).load()
    config = load_config(module.CONFIG_CLASS, args.config, args.overrides)
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    result = module.run(config)
    if result.losses:
        print(
            f"Trained {result.global_step} steps; loss {result.losses[0]:.4f} (first) -> {result.losses[-1]:.4f} "
            f"(last); adapter: {result.output_dir}"
        )
    return 0


TRAIN = Command("train a BOFT adapter with a recipe", _add_train_arguments, _run_train)


# --- other commands: one module each in boft_diffusion.commands -------------------------------------
def load_command(name: str) -> Command:
    """The command ``name``: ``train`` here, else the ``COMMAND`` of ``boft_diffusion.commands.<name>``."""
    if name == "train":
        return TRAIN
    module = importlib.import_module(f"{__package__ or 'boft_diffusion'}.commands.{name}")
    return module.COMMAND


def build_parser(commands: dict[str, Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="boft-diffusion", description="Orthogonal Butterfly (BOFT) finetuning for diffusers pipelines."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in commands.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit code."""
    commands = {name: load_command(name) for name in COMMAND_NAMES}
    args = build_parser(commands).parse_args(argv)
    try:
        return commands[args.command].run(args) or 0
    except input_errors() as err:
        if os.environ.get("BOFT_DIFFUSION_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
