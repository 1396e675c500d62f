"""The ``sample``, ``merge`` and ``inspect`` subcommands of ``boft-diffusion``, and what they share.

Each module exposes ``HELP``, ``EXAMPLE``, ``add_arguments(parser)``, ``run(args) -> exit code`` and
``COMMAND`` (a :class:`boft_diffusion.cli.Command`); ``python -m boft_diffusion.commands.<name>`` runs
one on its own. Bad input is one ``error:`` line on stderr and exit code 2; heavy imports (torch,
diffusers) happen inside ``run`` so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "EXIT_BAD_INPUT",
    "CommandError",
    "add_example",
    "check_new_output",
    "load_base",
    "number",
    "parse_adapter_spec",
    "reports_errors",
    "standalone_main",
]

EXIT_BAD_INPUT = 2


class CommandError(ValueError):
    """Bad input to a command; its message is printed as one ``error:`` line."""


def add_example(parser: argparse.ArgumentParser, example: str) -> None:
    """Show ``example`` (verbatim) at the end of ``--help``; usage errors become one line, exit code 2."""
    parser.epilog = example
    parser.formatter_class = argparse.RawDescriptionHelpFormatter

    def one_line_error(message: str) -> NoReturn:
        parser.exit(EXIT_BAD_INPUT, f"{parser.prog}: error: {message} (see --help)\n")

    parser.error = one_line_error  # type: ignore[method-assign]


def number(text: str) -> float:
    """argparse ``type`` for a finite float, with a message that names the bad value."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def parse_adapter_spec(spec: str, default_weight: float = 1.0) -> tuple[Path, float]:
    """``PATH[:WEIGHT]`` -> ``(path, weight)``. A path that exists as written wins over a ``:suffix``."""
    if os.path.exists(spec) or ":" not in spec:
        path, weight = spec, None
    else:
        path, _, weight = spec.rpartition(":")
    if not path:
        raise CommandError(f"adapter {spec!r}: no path before ':'")
    if weight is None:
        return Path(path), default_weight
    try:
        value = float(weight)
    except ValueError:
        raise CommandError(f"adapter {spec!r}: weight {weight!r} is not a number") from None
    if not math.isfinite(value):
        raise CommandError(f"adapter {spec!r}: weight {weight!r} is not a finite number")
    return Path(path), value


def check_new_output(path: str | os.PathLike) -> Path:
    """Refuse an output path that exists (nothing is overwritten); returns it as a ``Path``."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise CommandError(f"{path}: output path already exists; choose a new one")
    return path


def check_adapter_path(path: Path) -> None:
    if not path.exists():
        raise CommandError(f"{path}: no such adapter file or folder")


def load_base(base: str, torch_dtype: Any = None, device: str | None = None) -> Any:
    """A diffusers pipeline from a local folder (or a hub id where the hub is reachable), progress bars off."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # one progress bar per command: the command's own
    transformers_logging.disable_progress_bar()
    local = Path(base)
    if not local.exists() and (local.is_absolute() or base.startswith((".", "~")) or base.count("/") > 1):
        raise CommandError(f"{base}: no such base model folder")
    if local.is_file():
        raise CommandError(f"{base}: --base must be a diffusers folder (with model_index.json) or a hub id")
    try:
        pipe = DiffusionPipeline.from_pretrained(base, torch_dtype=torch_dtype)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CommandError(f"cannot load base model {base!r}: {first}") from err
    if device:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from ..io import AdapterFormatError

    return (
        CommandError,
        AdapterFormatError,
        FileExistsError,
        FileNotFoundError,
        NotADirectoryError,
        ValueError,
    )


def reports_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap ``run``: bad input prints one ``error:`` line and returns 2 (``BOFT_DIFFUSION_DEBUG=1`` re-raises)."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except _bad_input_errors() as err:
            if os.environ.get("BOFT_DIFFUSION_DEBUG"):
                raise
            message = " ".join(str(err).split()) or type(err).__name__
            print(f"error: {message}", file=sys.stderr)
            return EXIT_BAD_INPUT

    return wrapper


def make_command(help_text: str, add_arguments: Callable, run: Callable) -> Any:
    """The :class:`boft_diffusion.cli.Command` of a subcommand (``None`` if the CLI module is absent)."""
    try:
        from ..cli import Command
    except ImportError:  # pragma: no cover - the CLI ships with the package
        return None
    return Command(help_text, add_arguments, run)


def standalone_main(
    name: str, help_text: str, add_arguments: Callable, run: Callable, argv: Sequence[str] | None = None
) -> int:
    """``python -m boft_diffusion.commands.<name>``: the subcommand as its own program."""
    parser = argparse.ArgumentParser(prog=f"boft-diffusion {name}", description=help_text)
    add_arguments(parser)
    return run(parser.parse_args(argv)) or 0
