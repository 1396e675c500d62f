"""``boft-diffusion eval``: what an adapter taught, measured before and after it, as the DreamBooth papers do.

The probe (instance prompt, class prompt, context prompts, images per prompt, seed, steps, guidance)
samples the base alone, then the base with the adapter merged in, and the scorer turns both into
:func:`boft_diffusion.metrics.measure_dreambooth`'s metrics: subject fidelity (the images of the
instance prompt and of every context prompt against the instance images), prompt fidelity (the context
prompts' images against their prompts) and class drift (the class prompt's images against the instance
images), each also per prompt (``per_prompt`` in the JSON).

Without ``--base`` it measures the embedded tiny pipeline pretrained on the world, with the world's
probe, subject images and scorer. A user's base needs its instance images, prompts and a scorer
(``clip:PATH``, ``dino:PATH`` or both): the world scorer only reads the embedded world.

Before sampling, the adapter's recorded ``base_fingerprint`` (:func:`boft_diffusion.base_fingerprint`
of the base it was trained on) must match this base: an adapter trained on another base is refused.
Bad input of any kind is one ``error:`` line and exit code 2, with nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
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
    check_steps,
    load_base,
    number,
    one_line,
    reports_input_errors,
    writing,
)

HELP = "measure an adapter's subject fidelity, prompt fidelity and class drift, before and after it"
EXAMPLE = """examples:
  boft-diffusion eval outputs/dreambooth-tiny --grid eval.png
  boft-diffusion eval outputs/toy-boft --base ./sd15 --instance-dir ./toy-photos \\
      --instance-prompt "a photo of sks toy" --class-prompt "a photo of a toy" \\
      --context-prompt "a photo of sks toy on the beach" --context-prompt "a sks toy in the snow" \\
      --scorer dino:./dinov2-small,clip:./clip-vit-base --out metrics.json

Without --base: the embedded tiny pipeline, the world's subject, prompts and scorer.
Writes <ADAPTER folder>/eval_metrics.json unless --out says otherwise."""

TINY_BASE = "boft_diffusion.tiny (world)"
"""The embedded base as training names it in an adapter's ``base_model`` metadata."""
DEFAULT_OUT_NAME = "eval_metrics.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_example(parser, EXAMPLE)
    parser.add_argument(
        "adapter", metavar="ADAPTER", help="adapter file or folder (project format or PEFT BOFT)"
    )
    parser.add_argument(
        "--base",
        default=None,
        help="base pipeline: a diffusers folder or a hub id (default: the embedded tiny one)",
    )
    parser.add_argument(
        "--instance-dir", default=None, help="the subject's images (default: the world's subject)"
    )
    parser.add_argument(
        "--instance-prompt", default=None, help='prompt naming the subject, e.g. "a photo of sks toy"'
    )
    parser.add_argument(
        "--class-prompt", default=None, help='prompt naming its class, e.g. "a photo of a toy"'
    )
    parser.add_argument(
        "--context-prompt",
        action="append",
        default=None,
        metavar="PROMPT",
        help="the subject in a new context; repeat for several",
    )
    parser.add_argument(
        "--scorer",
        default=None,
        metavar="SPEC",
        help="world | clip:PATH | dino:PATH | dino:PATH,clip:PATH (default: world, for the embedded base only)",
    )
    parser.add_argument("--num-images", type=int, default=None, help="images per prompt")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first image of each prompt")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps")
    parser.add_argument("--guidance-scale", type=number, default=None, help="classifier-free guidance")
    parser.add_argument(
        "--out", default=None, help=f"metrics JSON (default: <ADAPTER folder>/{DEFAULT_OUT_NAME})"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out and --grid if they exist")
    parser.add_argument("--grid", default=None, help="PNG grid: a row per prompt, images before then after")


# --- cheap checks: nothing loaded or written yet ----------------------------------------------------
def default_out(adapter: Path) -> Path:
    """``<ADAPTER folder>/eval_metrics.json`` (the file's folder for an adapter file)."""
    return (adapter if adapter.is_dir() else adapter.parent) / DEFAULT_OUT_NAME


def _inputs(args: argparse.Namespace, adapter: Path) -> list[Path | str | None]:
    """What eval reads: the adapter's files, the base folder, the subject's images, the scorers' folders."""
    scorers = [part.partition(":")[2] for part in (args.scorer or "").split(",") if ":" in part]
    return [*adapter_inputs(adapter), *base_inputs(args.base), args.instance_dir, *scorers]


def _check_outputs(args: argparse.Namespace, adapter: Path) -> tuple[Path, Path | None]:
    inputs = _inputs(args, adapter)
    out = check_new_output(args.out or default_out(adapter), inputs=inputs, overwrite=args.overwrite)
    grid = None
    if args.grid is not None:
        grid = Path(args.grid)
        if grid.suffix.lower() != ".png":
            raise CommandError(f"--grid {grid}: the grid is a PNG file; use a .png name")
        check_new_output(grid, inputs=inputs, overwrite=args.overwrite)
        if grid.absolute() == out.absolute():
            raise CommandError(f"--grid and --out are the same file {out}")
    return out, grid


def _check_user_base(args: argparse.Namespace) -> None:
    """A user's base needs the subject's images, the prompts and a scorer that reads real images."""
    missing = [
        flag
        for flag, value in (
            ("--instance-dir", args.instance_dir),
            ("--instance-prompt", args.instance_prompt),
            ("--class-prompt", args.class_prompt),
            ("--context-prompt", args.context_prompt),
        )
        if value is None
    ]
    if missing:
        raise CommandError(
            f"with --base, give {', '.join(missing)} (the world's subject and prompts only fit the embedded base)"
        )
    if args.scorer is None:
        raise CommandError("with --base, give --scorer clip:PATH (or dino:PATH, or dino:PATH,clip:PATH)")
    if args.scorer.strip() == "world":
        raise CommandError(
            "--scorer world only reads the embedded world; with --base use --scorer clip:PATH or dino:PATH"
        )


def _check_prompts(args: argparse.Namespace) -> None:
    for flag, prompts in (
        ("--instance-prompt", [args.instance_prompt]),
        ("--class-prompt", [args.class_prompt]),
        ("--context-prompt", args.context_prompt or []),
    ):
        if any(p is not None and not p.strip() for p in prompts):
            raise CommandError(f"{flag}: a prompt is empty")


def make_probe(args: argparse.Namespace) -> Any:
    """The :class:`~boft_diffusion.metrics.DreamBoothProbe`: the world's, or the user's, with the options given."""
    from ..metrics import DreamBoothProbe, world_dreambooth_probe

    given = {
        "instance_prompt": args.instance_prompt,
        "class_prompt": args.class_prompt,
        "context_prompts": tuple(args.context_prompt) if args.context_prompt is not None else None,
        "num_images": args.num_images,
        "seed": args.seed,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
    }
    given = {k: v for k, v in given.items() if v is not None}
    return world_dreambooth_probe(**given) if args.base is None else DreamBoothProbe(**given)


# --- loading -------------------------------------------------------------------------------------
def instance_images(folder: str | None) -> list[Any]:
    """The subject's images as RGB PIL images: from ``folder``, else the world subject's views that
    ``train dreambooth`` generates by default (:func:`boft_diffusion.tiny.subject_views`)."""
    from ..data import list_images, load_rgb

    if folder is None:
        from ..tiny import subject_views

        return subject_views()
    return [load_rgb(path) for path in list_images(folder, role="instance")]


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_base(base: str | None, device: str) -> Any:
    if base is not None:
        return load_base(base, device=device)
    from ..tiny import build_tiny_pipeline

    try:
        pipe = build_tiny_pipeline()
    except FileNotFoundError as err:  # an install without the shipped weights
        raise CommandError(f"the embedded tiny pipeline: {one_line(err)}") from err
    return pipe.to(device)


def check_same_base(adapter: Path, metadata: dict[str, str], pipe: Any) -> str:
    """Refuse an adapter whose recorded ``base_fingerprint`` is not this base's; returns this base's.

    ``metadata`` is the adapter file's. One that records no fingerprint (older files, PEFT folders)
    passes with a warning on stderr. A base stored in float32 and trained in float16 has the fingerprint
    of its float16 cast (see :func:`~boft_diffusion.pipeline.base_fingerprint`): both count as this base, and
    so does a full-precision base for an adapter trained on its quantized load (:func:`~boft_diffusion.pipeline.same_base`).
    """
    from ..pipeline import base_fingerprint, same_base

    recorded = metadata.get("base_fingerprint") or None
    same, ours = same_base(pipe, recorded) if recorded else (True, base_fingerprint(pipe))
    if recorded is None:
        print(
            f"warning: adapter {adapter} records no base_fingerprint; cannot check that it was "
            "trained on this base model",
            file=sys.stderr,
        )
    elif not same:
        raise CommandError(
            f"adapter {adapter} was trained on another base model "
            f"({metadata.get('base_model', 'unnamed')}, fingerprint {recorded}), this base has fingerprint {ours}"
        )
    return ours


def _merge_adapter(pipe: Any, adapter: Path) -> None:
    """Load the adapter and merge it into the weights (sampling at base-model speed)."""
    from ..io import load_boft_weights
    from ..pipeline import merge_boft

    load_boft_weights(pipe, adapter)
    try:
        merge_boft(pipe)
    except ValueError as err:  # the adapter merges to a non-finite weight: it is broken
        raise CommandError(one_line(err)) from err


# --- outputs -------------------------------------------------------------------------------------
def _write_grid(before: Any, after: Any, path: Path) -> None:
    """A row per prompt: its images before the adapter, then after (written atomically)."""
    from ..atomic import atomic_file
    from ..metrics import before_after_rows, grid

    with writing(path, "the grid"), atomic_file(path) as tmp:
        grid(before_after_rows(before, after)).save(tmp, format="PNG")


def _write_metrics(report: dict[str, Any], path: Path) -> None:
    from ..atomic import atomic_write_text

    with writing(path, "the metrics"):
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")


@reports_input_errors
def run(args: argparse.Namespace) -> int:
    adapter = Path(args.adapter)
    check_adapter_path(adapter)
    out, grid_path = _check_outputs(args, adapter)
    if args.base is not None:
        _check_user_base(args)
    _check_prompts(args)
    probe = make_probe(args)
    scorer_spec = args.scorer or "world"

    from ..io import read_adapter
    from ..metrics import load_scorer, measure_dreambooth

    metadata = read_adapter(adapter).metadata  # a broken file fails before any model loads
    if "control" in metadata:
        raise CommandError(
            f"{adapter}: a controllable-generation adapter (boft-diffusion train controlnet); eval measures "
            "DreamBooth adapters. Its control fidelity, before and after training, is in its metrics.json"
        )
    images = instance_images(args.instance_dir)
    device = _device()
    scorer = load_scorer(scorer_spec, device=device)
    pipe = _load_base(args.base, device)
    check_steps(pipe, probe.num_inference_steps)
    fingerprint = check_same_base(adapter, metadata, pipe)

    before = measure_dreambooth(pipe, probe, images, scorer)
    _merge_adapter(pipe, adapter)
    after = measure_dreambooth(pipe, probe, images, scorer)

    report = {
        "adapter": str(adapter),
        "base": args.base or TINY_BASE,
        "base_fingerprint": fingerprint,
        "scorer": scorer_spec,
        "probe": asdict(probe),
        "before": before.metrics,
        "after": after.metrics,
        "per_prompt": {"before": before.per_prompt, "after": after.per_prompt},
    }
    _write_metrics(report, out)
    if grid_path is not None:
        _write_grid(before, after, grid_path)
    from ..metrics import format_metrics

    print(format_metrics(before.metrics, after.metrics, report["scorer"], report["per_prompt"]))
    print(f"Wrote {out}" + (f" and {grid_path}" if grid_path else ""))
    return 0


COMMAND = Command(HELP, add_arguments, run)
