"""The embedded world's control data: held-out scenes with their exact condition maps, written once into
a folder and refused when that folder holds something else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from ..atomic import staged_dir
from ..world import caption_of, condition_image, render, sample_scenes
from .images import DataError

_WORLD_MANIFEST = "world_control.json"


def write_world_control_data(
    folder: str | Path, num_examples: int, seed: int, kind: str = "edges", resolution: int = 64
) -> Path:
    """The embedded world's ControlNet data in ``folder``, in the layout :func:`load_control_examples` reads.

    ``images/00000.png`` (the scene rendered at ``resolution``), ``conditioning_images/00000.png``
    (its ``condition_image(maps, kind)``), ``metadata.jsonl`` rows ``{"image", "conditioning_image",
    "text"}`` (the scene's caption), for ``sample_scenes(num_examples, seed=seed)``; plus
    ``world_control.json``, the manifest that marks the folder as written here. Deterministic (same
    bytes for the same arguments) and atomic (built beside ``folder``, then renamed). A complete
    folder written with the same arguments is reused; one written here with other arguments is
    replaced; any other existing folder (other files in it) is a :class:`DataError`.
    """
    folder = Path(folder).expanduser()
    for label, value, low in (("num_examples", num_examples, 1), ("resolution", resolution, 8)):
        if not isinstance(value, int) or value < low:
            raise DataError(f"{label} must be an integer >= {low}, got {value!r}")
    if kind not in ("mask", "edges"):
        raise DataError(f"Unknown condition kind {kind!r}; expected 'mask' or 'edges'")
    manifest = {
        "writer": "boft_diffusion.data.write_world_control_data",
        "num_examples": num_examples,
        "seed": seed,
        "kind": kind,
        "resolution": resolution,
    }
    state = _world_data_state(folder, manifest)
    if state == "complete":
        return folder
    if state == "foreign":
        raise DataError(_foreign_world_folder(folder))
    try:
        with staged_dir(
            folder, replace=lambda target: _world_data_state(target, manifest) == "stale"
        ) as staging:
            _write_world_examples(staging, manifest)
    except FileExistsError:  # another process finished it meanwhile: fine if it is what we wanted
        if _world_data_state(folder, manifest) != "complete":
            raise DataError(_foreign_world_folder(folder)) from None
    return folder


def _foreign_world_folder(folder: Path) -> str:
    return (
        f"{folder} exists and is not world ControlNet data written by write_world_control_data "
        f"(no matching {_WORLD_MANIFEST}, or other files in it); choose another folder"
    )


def _world_files(num_examples: int) -> set[str]:
    names = [f"{k:05d}.png" for k in range(num_examples)]
    return {
        _WORLD_MANIFEST,
        "metadata.jsonl",
        "images",
        "conditioning_images",
        *(f"images/{n}" for n in names),
        *(f"conditioning_images/{n}" for n in names),
    }


def _world_data_state(folder: Path, manifest: dict[str, Any]) -> str:
    """``"missing"``, ``"complete"`` (ours, these arguments), ``"stale"`` (ours or empty) or ``"foreign"``."""
    if not folder.exists() and not folder.is_symlink():
        return "missing"
    if folder.is_symlink() or not folder.is_dir():
        return "foreign"
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*")}
    if not present:
        return "stale"
    try:
        found = json.loads((folder / _WORLD_MANIFEST).read_text(encoding="utf-8"))
        ours = found["writer"] == manifest["writer"] and present <= _world_files(int(found["num_examples"]))
    except (OSError, ValueError, TypeError, KeyError):
        return "foreign"
    if not ours:
        return "foreign"
    if found != manifest or "metadata.jsonl" not in present:
        return "stale"
    rows = len((folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines())
    return "complete" if rows == manifest["num_examples"] and present == _world_files(rows) else "stale"


def _write_world_examples(staging: Path, manifest: dict[str, Any]) -> None:
    (staging / "images").mkdir()
    (staging / "conditioning_images").mkdir()
    rows = []
    for k, scene in enumerate(sample_scenes(manifest["num_examples"], seed=manifest["seed"])):
        pixels, maps = render(scene, manifest["resolution"])
        name = f"{k:05d}.png"
        Image.fromarray(pixels).save(staging / "images" / name, format="PNG")
        condition_image(maps, manifest["kind"]).save(staging / "conditioning_images" / name, format="PNG")
        row = {
            "image": f"images/{name}",
            "conditioning_image": f"conditioning_images/{name}",
            "text": caption_of(scene),
        }
        rows.append(json.dumps(row))
    (staging / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (staging / _WORLD_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
