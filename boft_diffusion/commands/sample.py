"""``boft-diffusion sample``: images from a base pipeline with BOFT adapters, saved as one PNG grid.

Image ``i`` uses seed ``S + i``, so it does not depend on how many images are asked for. Adapters are
merged into the weights before sampling (base-model speed); the grid PNG records prompt, seed, steps
and adapters in its text chunks. A broken adapter (NaN or inf values, or a merge to a non-finite
weight) is one ``error:`` line and exit code 2, and no image is written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
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
    parse_adapter_spec,
    reports_input_errors,
    writing,
)

HELP = "sample images from a pipeline with BOFT adapters into a PNG grid"
EXAMPLE = """example:
  boft-diffusion sample --base ./sd15 --adapter ./out/toy-boft --scale 0.8 \\
      --prompt "a photo of sks toy on the beach" --num-images 4 --seed 0 --out grid.png

  boft-diffusion sample --base ./sd15 --adapter ./out/canny-boft --control edges.png \
      --prompt "a photo of a house" --out grid.png          # an adapter trained with `train controlnet`

--adapter PATH[:WEIGHT] may repeat (adapters compose); --scale is the weight of those given without one.
--control IMAGE samples under control: the adapter's light encoder or ControlNet follows the image.
--controlnet PATH gives the ControlNet an adapter was trained on (`inspect` names it); an adapter
initialised from the UNet needs none."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_example(parser, EXAMPLE)
    parser.add_argument("--base", required=True, help="base pipeline: a diffusers folder or a hub id")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="BOFT adapter (project file/folder or PEFT folder); repeat to compose several",
    )
    parser.add_argument("--scale", type=number, default=1.0, help="adapter strength: 0 = base, 1 = adapter")
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt")
    parser.add_argument("--num-images", type=int, default=4, help="number of images in the grid (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    parser.add_argument("--guidance-scale", type=number, default=7.5, help="classifier-free guidance")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (pipeline default)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (pipeline default)")
    parser.add_argument(
        "--control",
        default=None,
        metavar="IMAGE",
        help="control image (edges, mask, ...) for an adapter trained with `train controlnet`",
    )
    parser.add_argument(
        "--conditioning-scale", type=number, default=1.0, help="ControlNet residual scale (with --control)"
    )
    parser.add_argument(
        "--controlnet",
        default=None,
        metavar="PATH",
        help="the ControlNet (diffusers folder or hub id) an adapter trained on one was trained on; its "
        "fingerprint must be the one the adapter records (an adapter never opens one itself)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="weights dtype")
    parser.add_argument("--out", required=True, help="output PNG grid (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _validate(args: argparse.Namespace) -> list[tuple[Path, float]]:
    """Check everything cheap before loading a model; returns ``[(adapter path, weight)]``."""
    if args.num_images < 1:
        raise CommandError(f"--num-images must be at least 1 (got {args.num_images})")
    if args.steps < 1:
        raise CommandError(f"--steps must be at least 1 (got {args.steps})")
    for side in ("height", "width"):
        value = getattr(args, side)
        if value is not None and (value < 8 or value % 8):
            raise CommandError(f"--{side} must be a positive multiple of 8 (got {value})")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CommandError(f"--out {out}: the grid is a PNG file; use a .png name")
    adapters = [parse_adapter_spec(spec, args.scale) for spec in args.adapter]
    for path, _ in adapters:
        check_adapter_path(path)
    inputs = [
        *base_inputs(args.base),
        *(f for path, _ in adapters for f in adapter_inputs(path)),
        args.control,
        *base_inputs(args.controlnet),
    ]
    check_new_output(out, inputs=inputs, overwrite=args.overwrite)
    if args.control is not None:
        from ..data import DataError, load_rgb

        try:
            args.control_image = load_rgb(Path(args.control).expanduser())
        except (DataError, OSError) as err:
            raise CommandError(f"--control {args.control}: {one_line(err)}") from None
    return adapters


def _save_png(image: Any, path: Path, text: dict[str, str]) -> None:
    """Write the PNG atomically (no partial file), ``text`` in its text chunks."""
    from PIL.PngImagePlugin import PngInfo

    from ..atomic import atomic_file

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    with writing(path, "the grid"), atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def _device(name: str | None) -> str:
    """``--device`` checked before the model loads (default: cuda if available, else cpu)."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CommandError(f"--device {name!r}: {one_line(err)}") from None
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise CommandError(f"--device {name!r}: no such CUDA device here")
    return name


def _generate(pipe: Any, args: argparse.Namespace) -> list[Any]:
    """Image ``i`` from seed ``--seed + i`` (the package's one seeding rule, ``sampling.seeded_images``), one
    at a time, with a single progress bar over all denoising steps."""
    from tqdm.auto import tqdm

    from ..families import UnsupportedFamilyError, family_of
    from ..sampling import image_seeds, seeded_images

    try:  # the optional arguments its call takes, as its family says (FLUX.2 [klein]: no negative prompt)
        accepted = family_of(pipe).call_arguments
    except UnsupportedFamilyError:  # a stock pipeline of no supported family: its call's signature says
        accepted = None

    with tqdm(total=args.num_images * args.steps, desc="Sampling", unit="step", file=sys.stderr) as bar:
        done = 0

        def step_done(pipeline: Any, step: int, timestep: Any, kwargs: dict) -> dict:
            bar.update(1)
            return kwargs

        def image_done(n: int) -> None:
            nonlocal done
            done += n
            bar.n = done * args.steps  # schedulers may run a different number of steps
            bar.refresh()

        return seeded_images(
            pipe,
            [args.prompt] * args.num_images,
            image_seeds(args.seed, args.num_images),
            batch_size=1,
            on_batch=image_done,
            accepted=accepted,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            height=args.height,
            width=args.width,
            callback_on_step_end=step_done,
        )


def _generate_controlled(pipe: Any, args: argparse.Namespace) -> list[Any]:
    """One image per seed under ``--control``, through the adapter's light encoder or ControlNet."""
    from ..control import light_control, sample_with_control

    if light_control(pipe) is None and getattr(pipe, "controlnet", None) is None:
        raise CommandError(
            f"--control {args.control}: no adapter given brings a control (a light encoder or a ControlNet); "
            "train one with `boft-diffusion train controlnet`, or sample without --control"
        )
    if args.height != args.width:
        raise CommandError(
            "--control: give --height and --width equal (or neither); control images are square here"
        )
    n = args.num_images
    return sample_with_control(
        pipe, [args.prompt] * n, [args.control_image] * n, [args.seed + i for i in range(n)],
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
        conditioning_scale=args.conditioning_scale, resolution=args.height,
    )  # fmt: skip


def _load_controlnet(source: str | None, torch_dtype: Any, device: str) -> Any:
    """The ControlNet ``--controlnet`` names (a diffusers folder or hub id), or ``None``."""
    if source is None:
        return None
    from diffusers import ControlNetModel

    local = Path(source).expanduser()
    if not local.exists() and (local.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1):
        raise CommandError(f"--controlnet {source}: no such ControlNet folder")
    try:
        controlnet = ControlNetModel.from_pretrained(
            str(local) if local.exists() else source, torch_dtype=torch_dtype
        )
    except (OSError, ValueError) as err:  # what diffusers raises for a folder or hub id it cannot load
        raise CommandError(f"--controlnet {source}: cannot load a ControlNet ({one_line(err)})") from err
    return controlnet.to(device).eval()


def _load_merged(args: argparse.Namespace, adapters: list[tuple[Path, float]], device: str) -> Any:
    """The base pipeline with the adapters merged into its weights (sampling at base-model speed)."""
    from ..export import parse_dtype
    from ..io import load_boft_weights
    from ..pipeline import merge_boft, set_boft_adapters

    pipe = load_base(args.base, parse_dtype(args.dtype), device)
    controlnet = _load_controlnet(args.controlnet, parse_dtype(args.dtype), device)
    names = [
        load_boft_weights(pipe, path, adapter_name=f"adapter{i}", controlnet=controlnet)
        for i, (path, _) in enumerate(adapters)
    ]
    if controlnet is not None and getattr(pipe, "controlnet", None) is not controlnet:
        raise CommandError(f"--controlnet {args.controlnet}: no adapter given holds ControlNet weights")
    if names:
        set_boft_adapters(pipe, names, [weight for _, weight in adapters])
        try:
            merge_boft(pipe)
        except ValueError as err:  # the adapters merge to a non-finite weight: they are broken
            raise CommandError(one_line(err)) from err
    return pipe


@reports_input_errors
def run(args: argparse.Namespace) -> int:
    from diffusers.utils import make_image_grid
    from PIL import Image

    adapters = _validate(args)
    device = _device(args.device)
    pipe = _load_merged(args, adapters, device)
    check_steps(pipe, args.steps)
    images = _generate(pipe, args) if args.control is None else _generate_controlled(pipe, args)
    text = {
        "prompt": args.prompt,
        "seed": str(args.seed),
        "steps": str(args.steps),
        "base": args.base,
        "adapters": json.dumps([{"path": str(p), "weight": w} for p, w in adapters]),
        **({"control": str(args.control)} if args.control is not None else {}),
    }
    out = Path(args.out)
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    blank = Image.new("RGB", images[0].size, "white")  # fills the last row
    _save_png(make_image_grid([*images, *[blank] * (rows * cols - len(images))], rows, cols), out, text)
    print(f"Wrote {len(images)} image(s) as a grid to {out}")
    return 0


COMMAND = Command(HELP, add_arguments, run)
