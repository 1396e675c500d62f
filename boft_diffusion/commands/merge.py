"""``boft-diffusion merge``: fold one or more BOFT adapters, blended by weight, into a base pipeline.

Adapters compose by multiplying their rotations, each at its own strength ``w`` (``R(w) = Cayley(w Q)``,
scales ``1 + w (s - 1)``). The result is written by :func:`boft_diffusion.export.export_merged`: a
diffusers folder or one original-layout ``.safetensors`` file, with provenance in its metadata.
Everything that can be checked before loading the model is checked first; on any error (a broken
adapter holding NaN or inf values, or merging to a non-finite weight, included) nothing is left at
``--out``, one ``error:`` line is printed and the exit code is 2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from . import (
    Command,
    CommandError,
    adapter_inputs,
    add_example,
    base_inputs,
    check_adapter_path,
    check_new_output,
    load_base,
    one_line,
    parse_adapter_spec,
    reports_input_errors,
    writing,
)

HELP = "merge BOFT adapters (blended by weight) into a base pipeline and export it (alias: export)"
EXAMPLE = """examples:
  boft-diffusion merge --base ./sd15 --adapter ./out/toy-boft:1.0 --adapter ./out/style-boft:0.5 \\
      --out ./sd15-toy-style --dtype fp16
  boft-diffusion merge --base ./sd15 --adapter ./out/toy-boft --out toy.safetensors --format single-file

single-file output: a path ending in .safetensors is the file itself; any other path becomes a folder
with model.safetensors (load it with StableDiffusionPipeline.from_single_file(file, config=BASE), or
StableDiffusionXLPipeline.from_single_file for an SDXL base)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_example(parser, EXAMPLE)
    parser.add_argument("--base", required=True, help="base pipeline: a diffusers folder or a hub id")
    parser.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="PATH[:WEIGHT]",
        help="adapter (project file/folder or PEFT folder) with an optional weight (default 1); repeat to blend",
    )
    parser.add_argument("--out", required=True, help="output folder or .safetensors file (must not exist)")
    parser.add_argument(
        "--format",
        choices=("diffusers", "single-file"),
        default="diffusers",
        help="diffusers folder (default) or one original-layout .safetensors file",
    )
    parser.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="dtype of the weights"
    )
    parser.add_argument("--variant", default=None, help="diffusers only: name files *.<variant>.safetensors")


def _adapter_names(paths: list[Path]) -> list[str]:
    """Readable, unique adapter names from file or folder names (they appear in the provenance)."""
    names: list[str] = []
    for path in paths:
        stem = path.stem if path.is_file() else path.name
        if stem in ("boft_weights", "adapter_model", "") and path.parent.name:
            stem = path.parent.name
        name, n = stem or "adapter", 2
        while name in names:
            name, n = f"{stem}_{n}", n + 1
        names.append(name)
    return names


def _export(pipe: Any, out: Path, args: argparse.Namespace, adapters: list[tuple[Path, float]]) -> None:
    """``export_merged``, its refusals of what the user gave as one :class:`CommandError`."""
    from ..export import export_merged

    with writing(out, "the merged checkpoint"):  # a full disk, a folder made read-only meanwhile
        try:
            export_merged(
                pipe,
                out,
                format=args.format.replace("-", "_"),
                dtype=args.dtype,
                variant=args.variant,
                base_model=args.base,
                extra_provenance={"adapter_files": [{"path": str(p), "weight": w} for p, w in adapters]},
            )
        except ValueError as err:  # a merge to non-finite weights; a base that has no single-file layout
            raise CommandError(one_line(err)) from err


@reports_input_errors
def run(args: argparse.Namespace) -> int:
    if args.variant and args.format != "diffusers":
        raise CommandError("--variant applies to --format diffusers only")
    adapters = [parse_adapter_spec(spec) for spec in args.adapter]
    for path, _ in adapters:
        check_adapter_path(path)
    inputs = [*base_inputs(args.base), *(f for path, _ in adapters for f in adapter_inputs(path))]
    out = check_new_output(args.out, inputs=inputs)

    from ..io import load_boft_weights
    from ..pipeline import set_boft_adapters

    start = time.perf_counter()
    pipe = load_base(args.base)  # merge in the checkpoint's own precision; export casts once at the end
    names = _adapter_names([path for path, _ in adapters])
    for name, (path, _) in zip(names, adapters):
        load_boft_weights(pipe, path, adapter_name=name)
    set_boft_adapters(pipe, names, [weight for _, weight in adapters])
    _export(pipe, out, args, adapters)
    blend = ", ".join(f"{name}:{weight:g}" for name, (_, weight) in zip(names, adapters))
    print(f"Merged {blend} into {args.base} -> {out} ({args.format}, {time.perf_counter() - start:.1f}s)")
    return 0


COMMAND = Command(HELP, add_arguments, run)
