"""The ``boft-diffusion`` console entry point: parse the command line, dispatch to the verb.

    boft-diffusion train dreambooth --config configs/dreambooth/tiny.yaml [section.key=value ...]
    boft-diffusion {train,sample,merge,export,inspect,eval,bench} ...

The verbs, their registry and the input-error policy (bad input is one ``error:`` line and exit code
2, a bug keeps its traceback) live in :mod:`boft_diffusion.commands`. Here: one parser over them, and
Ctrl-C as one line with exit code 130. ``python -m boft_diffusion.cli`` is the same program.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import commands
from .commands import Command, OneLineErrorParser

__all__ = ["EXIT_INTERRUPTED", "build_parser", "main"]

EXIT_INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), as shells report it."""


def build_parser(verbs: dict[str, Command]) -> argparse.ArgumentParser:
    """One parser with a subcommand per verb (usage errors are one line, exit code 2)."""
    parser = OneLineErrorParser(
        prog="boft-diffusion", description="Orthogonal Butterfly (BOFT) finetuning for diffusers pipelines."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in verbs.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the verb, return its exit code."""
    verbs = commands.load_commands()
    args = build_parser(verbs).parse_args(argv)
    try:
        return verbs[args.command].run(args) or 0
    except KeyboardInterrupt as err:  # Ctrl-C: one line (where to resume, if training), no traceback
        print(str(err) or "Interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
