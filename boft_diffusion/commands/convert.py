"""``boft-diffusion convert``: a BOFT adapter as a LoRA file or an exact full-difference patch.

``--to lora`` writes a truncated-SVD LoRA (:func:`boft_diffusion.export.lora.convert_to_lora`), in the
diffusers/PEFT layout that ``pipe.load_lora_weights`` opens or in the kohya layout the UIs read, with a
fixed ``--rank`` or a per-layer relative ``--error-budget`` (capped by ``--max-rank``). ``--to diff``
writes the whole weight change (:func:`boft_diffusion.export.lora.export_diff`, ``.diff`` / ``.diff_b``
keys that ComfyUI and AUTOMATIC1111 read). It prints the per-layer rank / error table and the file size;
with ``--check-pixels`` (default for ``--to lora``) it samples a few small images with the BOFT adapter
and with the LoRA file loaded by ``pipe.load_lora_weights`` (same seeds) and prints the largest pixel
difference (0..255).

Without ``--base`` the base is the embedded tiny pipeline. An adapter that records the
``base_fingerprint`` of another base is refused. Bad input is one ``error:`` line, exit code 2, and
nothing is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..io.format import atomic_save_safetensors
from . import (
    Command,
    CommandError,
    adapter_inputs,
    add_example,
    base_inputs,
    check_adapter_path,
    check_new_output,
    check_steps,
    load_base,
    number,
    one_line,
    reports_input_errors,
    writing,
)

HELP = "convert a BOFT adapter to a LoRA file (truncated SVD) or an exact full-difference patch"
EXAMPLE = """examples:
  boft-diffusion convert --base ./sd15 --adapter ./out/toy-boft --to lora --error-budget 0.05 \\
      --max-rank 64 --out toy-lora.safetensors
  boft-diffusion convert --base ./sd15 --adapter ./out/toy-boft --to lora --rank 16 --format kohya \\
      --out toy-lora-kohya.safetensors
  boft-diffusion convert --base ./sd15 --adapter ./out/toy-boft --to diff --out toy-diff.safetensors

--format diffusers: pipe.load_lora_weights(file) opens it; --format kohya (and --to diff): ComfyUI and
AUTOMATIC1111 read it (lora_unet_* / lora_te_* names). Without --base: the embedded tiny pipeline.
A path ending in .safetensors is the file; any other path becomes a folder with
pytorch_lora_weights.safetensors."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_example(parser, EXAMPLE)
    parser.add_argument(
        "--base", default=None, help="base pipeline (diffusers folder or hub id); default: tiny"
    )
    parser.add_argument(
        "--adapter", required=True, help="BOFT adapter file or folder (project or PEFT format)"
    )
    parser.add_argument("--to", choices=("lora", "diff"), required=True, help="LoRA (SVD) or exact full diff")
    parser.add_argument("--out", required=True, help="output .safetensors file or folder (must not exist)")
    rank = parser.add_mutually_exclusive_group()
    rank.add_argument("--rank", type=int, default=None, help="--to lora: one fixed rank for every layer")
    rank.add_argument(
        "--error-budget", type=number, default=None, help="--to lora: per-layer relative error in (0, 1)"
    )
    parser.add_argument("--max-rank", type=int, default=None, help="--to lora: cap on a budget's ranks")
    parser.add_argument(
        "--format", choices=("diffusers", "kohya"), default="diffusers", help="--to lora: key layout"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument(
        "--check-pixels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compare images of the adapter and of the written LoRA (default: on for --to lora)",
    )
    parser.add_argument("--prompt", action="append", default=None, help="prompt for --check-pixels (repeat)")
    parser.add_argument("--steps", type=int, default=4, help="--check-pixels: inference steps (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="--check-pixels: seed (default 0)")


def _check_args(args: argparse.Namespace) -> None:
    if args.to == "lora":
        if args.rank is None and args.error_budget is None:
            raise CommandError("--to lora needs --rank R or --error-budget E")
        if args.rank is not None and args.rank < 1:
            raise CommandError(f"--rank must be at least 1, not {args.rank}")
        if args.error_budget is not None and not 0.0 < args.error_budget < 1.0:
            raise CommandError(f"--error-budget must be in (0, 1), not {args.error_budget:g}")
        if args.max_rank is not None and (args.max_rank < 1 or args.rank is not None):
            raise CommandError("--max-rank caps --error-budget's ranks: at least 1, and not with --rank")
    else:
        given = [f for f, v in (("--rank", args.rank), ("--error-budget", args.error_budget),
                                ("--max-rank", args.max_rank)) if v is not None]  # fmt: skip
        if given or args.format != "diffusers":
            raise CommandError(f"{', '.join(given) or '--format'} applies to --to lora only")
        if args.check_pixels:
            raise CommandError("--check-pixels applies to --to lora only (a diff is exact)")
    if args.steps < 1:
        raise CommandError(f"--steps must be at least 1, not {args.steps}")


def _load(base: str | None) -> Any:
    if base is not None:
        return load_base(base)
    from ..tiny import build_tiny_pipeline

    try:
        return build_tiny_pipeline()
    except FileNotFoundError as err:  # an install without the shipped weights
        raise CommandError(f"the embedded tiny pipeline: {one_line(err)}") from err


def sample_images(pipe: Any, prompts: list[str], seed: int, steps: int, size: int | None) -> Any:
    """``len(prompts)`` images as a float array in [0, 1]; image ``i`` from seed ``seed + i`` (the package's
    one seeding rule, ``sampling.seeded_images``), all in one call."""
    import numpy as np

    from ..sampling import image_seeds, seeded_images

    kwargs = {"height": size, "width": size} if size else {}
    images = seeded_images(
        pipe, prompts, image_seeds(seed, len(prompts)), num_inference_steps=steps, output_type="np", **kwargs
    )
    return np.stack(images)


def pixel_difference(
    pipe: Any, lora: Path, prompts: list[str], seed: int, steps: int, size: int | None,
    load_beside: Any = None,
) -> float:  # fmt: skip
    """Largest pixel difference (0..255) between ``pipe``'s BOFT adapter and the LoRA file on the same base.

    The BOFT adapter is unloaded from ``pipe`` afterwards (the original modules go back), then the LoRA
    file is loaded with diffusers' ``load_lora_weights`` and ``load_beside(pipe)`` loads what was written
    next to it (new tokens: ``load_textual_inversion``).
    """
    import numpy as np

    from ..pipeline import unload_boft

    boft = sample_images(pipe, prompts, seed, steps, size)
    unload_boft(pipe)
    pipe.load_lora_weights(str(lora))
    if load_beside is not None:
        load_beside(pipe)
    converted = sample_images(pipe, prompts, seed, steps, size)
    pipe.unload_lora_weights()
    return float(np.abs(boft.astype(np.float64) - converted.astype(np.float64)).max() * 255.0)


@reports_input_errors
def run(args: argparse.Namespace) -> int:
    _check_args(args)
    adapter = Path(args.adapter)
    check_adapter_path(adapter)
    inputs = [*base_inputs(args.base), *adapter_inputs(adapter)]
    out = check_new_output(args.out, inputs=inputs, overwrite=args.overwrite)
    check_pixels = args.to == "lora" if args.check_pixels is None else args.check_pixels

    from ..export.lora import ConvertError, check_base_fingerprint, convert_to_lora, export_diff
    from ..io import load_boft_weights, read_adapter

    start = time.perf_counter()
    saved = read_adapter(adapter)  # a broken file fails before any model loads
    metadata = saved.metadata
    beside = _stock_files(saved, out, args, inputs) if args.to == "lora" else {}
    pipe = _load(args.base)
    if check_pixels:
        check_steps(pipe, args.steps)
    if not metadata.get("base_fingerprint"):
        print(
            f"warning: adapter {adapter} records no base_fingerprint; cannot check that it was trained on this base",
            file=sys.stderr,
        )
    with writing(out, "the file"):
        try:
            # before the adapter goes in
            check_base_fingerprint(pipe, metadata.get("base_fingerprint") or None)
            load_boft_weights(pipe, adapter)
            if args.to == "lora":
                report = convert_to_lora(
                    pipe,
                    out,
                    rank=args.rank,
                    budget=args.error_budget,
                    max_rank=args.max_rank,
                    format=args.format,
                    overwrite=args.overwrite,
                )
            else:
                report = export_diff(pipe, out, overwrite=args.overwrite)
        except ConvertError as err:
            raise CommandError(one_line(err)) from err
    for kind, files in beside.items():
        for suffix, tensors in kind.stock_files(saved).items():
            with writing(files[suffix], "the file"):
                atomic_save_safetensors(tensors, files[suffix], {"format": "pt"})
            print(f"wrote {files[suffix]} ({kind.name}, for the stock loader; see the README)")
    if args.to == "lora":
        print(report.table())
    else:
        print(
            f"{len(report.layers)} layers; {report.path} ({report.file_size / 1024:.1f} KiB); "
            f"W + diff == merged weight for all but {report.inexact} elements "
            f"(largest difference {report.max_abs_error:.2e}, within one float32 ulp)"
        )
        for note in report.notes:
            print(f"note: {note}")
    if check_pixels:
        if any(note.startswith("bias changes are '.diff_b'") for note in report.notes):
            print("pixel check skipped: diffusers cannot load a kohya file with '.diff_b' bias keys")
        elif any(note.startswith("no text-encoder out_proj") for note in report.notes):
            print("pixel check skipped: diffusers cannot load a kohya file without text-encoder out_proj")
        else:
            from ..tiny import TINY_RESOLUTION

            prompts = args.prompt or ["a photo of sks toy", "a photo of a toy"]
            size = TINY_RESOLUTION if args.base is None else None

            def load_beside(target: Any) -> None:
                for kind, files in beside.items():
                    kind.load_stock_files(target, saved, files)

            diff = pixel_difference(pipe, report.path, prompts, args.seed, args.steps, size, load_beside)
            print(
                f"largest pixel difference, BOFT vs LoRA (0..255, {len(prompts)} images, {args.steps} steps): {diff:.3f}"
            )
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


def _stock_files(
    saved: Any, out: Path, args: argparse.Namespace, inputs: list[Any]
) -> dict[Any, dict[str, Path]]:
    """``{kind: {suffix: path}}`` of what registered trained state writes next to the LoRA file (new token
    embeddings: ``<name>_emb.safetensors``); each path checked new before anything is written."""
    from ..trained_state import trained_states

    lora = out if out.suffix == ".safetensors" else out / "pytorch_lora_weights.safetensors"
    files = {}
    for kind in trained_states():
        if kind.name in saved.states:
            names = {s: lora.with_name(f"{lora.stem}{s}.safetensors") for s in kind.stock_files(saved)}
            for path in names.values():
                check_new_output(path, inputs=inputs, overwrite=args.overwrite)
            files[kind] = names
    return files


COMMAND = Command(HELP, add_arguments, run)
