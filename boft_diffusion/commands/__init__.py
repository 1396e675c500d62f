"""Every verb of ``boft-diffusion``: the registry, the one input-error policy, and what verbs share.

A verb is the module ``boft_diffusion.commands.<name>`` for each name in :data:`COMMAND_NAMES`; its
``COMMAND`` (a :class:`Command`: help line, ``add_arguments(parser)``, ``run(args) -> exit code``) is
what :mod:`boft_diffusion.cli` parses and dispatches. Each ``run`` is wrapped by
:func:`reports_input_errors`, the CLI's one policy for bad input: an exception of a type in
:func:`input_errors` is one ``error:`` line on stderr and exit code 2; any other exception is a bug and
keeps its traceback (``BOFT_DIFFUSION_DEBUG=1`` shows the traceback of bad input too). Heavy imports
(torch, diffusers) happen inside ``run`` so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from ..atomic import folder_write_problem, replaced_input

__all__ = [
    "COMMAND_NAMES",
    "EXIT_BAD_INPUT",
    "Command",
    "CommandError",
    "OneLineErrorParser",
    "add_example",
    "adapter_inputs",
    "base_inputs",
    "check_adapter_path",
    "check_new_output",
    "check_steps",
    "input_errors",
    "load_base",
    "load_command",
    "load_commands",
    "one_line",
    "number",
    "parse_adapter_spec",
    "reports_input_errors",
    "writing",
]

COMMAND_NAMES = ("train", "sample", "merge", "export", "convert", "inspect", "eval", "bench")
"""The verbs, in ``--help`` order; verb ``<name>`` is the ``COMMAND`` of ``boft_diffusion.commands.<name>``."""

EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class Command:
    """A verb: ``add_arguments`` fills its parser, ``run`` executes it and returns an exit code."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def load_command(name: str) -> Command:
    """The ``COMMAND`` of the module ``boft_diffusion.commands.<name>``."""
    return importlib.import_module(f"{__name__}.{name}").COMMAND


def load_commands() -> dict[str, Command]:
    """Every verb of :data:`COMMAND_NAMES`, in order."""
    return {name: load_command(name) for name in COMMAND_NAMES}


# --- the input-error policy -----------------------------------------------------------------------
class CommandError(ValueError):
    """Bad input to a command; its message is printed as one ``error:`` line."""


def input_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input (the project's own, each raised for what a user gave).

    ``CheckpointWriteError`` is a ``TrainingError``; ``WriteError`` is any write through the atomic
    helpers that failed for want of room or rights (one line naming the file, in every verb). Not here
    on purpose: bare ``ValueError``, ``OSError`` and the like; a command turns those into :class:`CommandError` where it checks or
    writes a user's path, so that any other one is reported as the bug it is.
    """
    from ..atomic import WriteError
    from ..data import DataError
    from ..io import AdapterFormatError
    from ..metrics import MetricsError, ScorerError
    from ..training.args import ConfigError
    from ..training.loop import TrainingError

    return (
        CommandError,
        ConfigError,
        DataError,
        AdapterFormatError,
        MetricsError,
        ScorerError,
        TrainingError,
        WriteError,
    )


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (its type name if it has none)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


@contextlib.contextmanager
def writing(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """The block writes ``what`` to ``path``: an ``OSError`` in it (a full disk, a folder made read-only
    meanwhile) becomes one :class:`CommandError` line naming both; a failed atomic write
    (:class:`~boft_diffusion.atomic.WriteError`) already is one line naming the file and passes as it is."""
    from ..atomic import WriteError

    try:
        yield
    except WriteError:
        raise
    except OSError as err:
        raise CommandError(f"{path}: cannot write {what} ({one_line(err)})") from err


def reports_input_errors(
    run: Callable[[argparse.Namespace], int | None],
) -> Callable[[argparse.Namespace], int]:
    """Wrap a verb's ``run``: bad input prints one ``error:`` line and returns 2; bugs propagate."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args) or 0
        except input_errors() as err:
            if os.environ.get("BOFT_DIFFUSION_DEBUG"):
                raise
            print(f"error: {one_line(err)}", file=sys.stderr)
            return EXIT_BAD_INPUT

    return wrapper


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (naming ``--help``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


# --- helpers the verbs share ----------------------------------------------------------------------
def add_example(parser: argparse.ArgumentParser, example: str) -> None:
    """Show ``example`` (verbatim) at the end of ``--help``."""
    parser.epilog = example
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


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


def check_new_output(
    path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None], overwrite: bool = False
) -> Path:
    """Check an output path before any work: it must not replace one of the command's ``inputs``
    (:func:`~boft_diffusion.atomic.replaced_input`: be, hold or overwrite something inside one, links
    resolved; whatever ``overwrite`` says), must not exist (with ``overwrite``: unless it is a file), and
    its nearest existing folder must be a writable folder. Returns it as a ``Path``.

    ``inputs`` is required: every verb that writes names what it reads (:func:`adapter_inputs` for an
    adapter, the base folder, data), so that no verb can write over its own input.
    """
    path = Path(path)
    replaced = replaced_input(path, inputs)
    if replaced is not None:
        raise CommandError(
            f"{path}: writing there would replace the input {replaced}; choose an output apart from the inputs"
        )
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise CommandError(f"{path}: output path already exists; choose a new one")
        if path.is_dir():
            raise CommandError(f"{path}: output path is a folder")
    problem = folder_write_problem(path.absolute().parent)
    if problem:
        raise CommandError(f"{path}: cannot write there, its folder {problem}")
    return path


def check_adapter_path(path: Path) -> None:
    if not path.exists():
        raise CommandError(f"{path}: no such adapter file or folder")


def adapter_inputs(path: str | os.PathLike) -> list[Path]:
    """The files reading the adapter at ``path`` opens (a folder's weights and configs), for
    :func:`check_new_output`: a new file beside them (``eval``'s metrics) replaces none of them.

    A folder whose format is not recognised counts as a whole (a command refuses it later anyway).
    """
    from ..io import AdapterFormatError, detect_format
    from ..io.peft import CONFIG_NAME

    path = Path(path)
    if not path.is_dir():
        return [path]
    try:
        files = list(detect_format(path).files.values())
    except (AdapterFormatError, OSError, ValueError):
        return [path]
    return files + [f.parent / CONFIG_NAME for f in files if (f.parent / CONFIG_NAME).is_file()]


def base_inputs(base: str | None) -> list[Path]:
    """A ``--base`` that is a local folder (all of it is read); a hub id or the embedded default: none."""
    return [Path(base)] if base is not None and Path(base).expanduser().exists() else []


def check_steps(pipe: Any, steps: int | None, flag: str = "--steps") -> None:
    """``steps`` denoising steps fit the pipeline's scheduler (at most its training timesteps)."""
    limit = getattr(getattr(pipe, "scheduler", None), "config", {}).get("num_train_timesteps")
    if steps is not None and limit is not None and steps > limit:
        raise CommandError(
            f"{flag} {steps}: this pipeline's scheduler has {limit} timesteps; use at most {limit}"
        )


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
    except (OSError, ValueError) as err:  # what diffusers raises for a folder or hub id it cannot load
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CommandError(f"cannot load base model {base!r}: {first}") from err
    if device:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
