"""A dataset file naming several DreamBooth concepts (``data.dataset_file``), as kohya sd-scripts'
dataset config does: each concept its photos, prompt, optional class images, repeats and loss masks.

    concepts:
      - name: dog                          # optional: the instance folder's name
        instance_data_dir: photos/dog      # relative paths: from the dataset file's folder
        instance_prompt: a photo of sks dog
        class_prompt: a photo of a dog     # needed with prior preservation
        class_data_dir: class/dog          # optional: <output_dir>/class_images/<name>
        num_class_images: 100              # optional: data.num_class_images
        repeats: 2                         # each photo twice an epoch (kohya's num_repeats)
        mask_dir: masks/dog                # optional loss masks

The file (YAML, or TOML with ``[[concepts]]`` tables) is read strictly: an unknown key, a missing folder,
a missing prompt or a bad value is one :class:`~boft_diffusion.data.images.DataError` naming the file,
the concept and the key, before anything is written.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .images import DataError, list_images

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: YAML only
    tomllib = None

__all__ = ["Concept", "concept_images", "load_concepts"]


@dataclass(frozen=True)
class Concept:
    """One subject of a DreamBooth run. A run of the ``data.*`` keys alone is one concept; a dataset file
    names several."""

    name: str
    """What the concept is called (its instance folder's name unless given; its default class folder's name)."""
    instance_prompt: str
    """Prompt of its photos (a photo's caption file still wins)."""
    instance_data_dir: Path | None = None
    """Folder of its photos (None: toy images generated into <output_dir>/instance_images)."""
    class_prompt: str | None = None
    """Prompt of its class images (needed with prior preservation)."""
    class_data_dir: Path | None = None
    """Folder of its class images, filled where missing (None: a folder inside output_dir)."""
    num_class_images: int | None = None
    """Class images to use (None: data.num_class_images)."""
    repeats: int = 1
    """How many times each of its photos appears per epoch (kohya's num_repeats)."""
    mask_dir: Path | None = None
    """Folder of its loss masks (one per photo, the photo's file stem)."""
    source: str | None = None
    """Where it is named (``<dataset file>: concepts[i]``; None: the data.* keys), for messages."""

    @property
    def folder_name(self) -> str:
        """Its name as one safe folder name (letters, digits, ``-``, ``_``, ``.``; never hidden)."""
        return re.sub(r"[^\w.-]+", "_", self.name).strip("._") or "concept"

    def problem(self, message: str) -> DataError:
        """A :class:`DataError` saying ``message`` about this concept (as the dataset file names it)."""
        return DataError(f"{self.source} ({self.name!r}): {message}" if self.source else message)


_KEYS = tuple(f.name for f in fields(Concept) if f.name != "source")
_FOLDERS = ("instance_data_dir", "class_data_dir", "mask_dir")


def load_concepts(path: str | Path, needs_class_prompt: bool = False) -> list[Concept]:
    """The concepts of the dataset file at ``path`` (``.yaml``, ``.yml`` or ``.toml``: a ``concepts`` list).

    Folders resolve against the file's folder; the instance and mask folders must exist. With
    ``needs_class_prompt`` (prior preservation) every concept must give its ``class_prompt``. Names
    (and the class folders named after them) must differ. Raises :class:`DataError` naming the file, the
    concept and the key.
    """
    path = Path(path).expanduser()
    raw = _read(path)
    if not isinstance(raw, dict) or set(raw) != {"concepts"}:
        extra = sorted(set(raw) - {"concepts"}) if isinstance(raw, dict) else []
        hint = f" (unknown key {extra[0]!r}{_suggest(extra[0], ['concepts'])})" if extra else ""
        raise DataError(f"data.dataset_file {path}: expected one key, 'concepts', holding a list{hint}")
    entries = raw["concepts"]
    if not isinstance(entries, list) or not entries:
        raise DataError(f"data.dataset_file {path}: 'concepts' must be a non-empty list of concepts")
    concepts = [_concept(entry, f"data.dataset_file {path}: concepts[{i}]", path.parent, needs_class_prompt)
                for i, entry in enumerate(entries)]  # fmt: skip
    seen: dict[str, Concept] = {}
    for concept in concepts:
        key = concept.folder_name.lower()
        if key in seen:
            raise concept.problem(
                f"another concept is named {seen[key].name!r} too (one class folder for both); give each "
                "concept its own 'name'"
            )
        seen[key] = concept
    return concepts


def _read(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"data.dataset_file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise DataError(f"data.dataset_file {path}: give a .yaml, .yml or .toml file")
    if suffix == ".toml" and tomllib is None:
        raise DataError(
            f"data.dataset_file {path}: reading TOML needs Python 3.11 or later; give a YAML file"
        )
    try:
        text = path.read_text(encoding="utf-8")
        return tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as err:  # TOMLDecodeError, UnicodeDecodeError: ValueErrors
        raise DataError(f"data.dataset_file {path} cannot be read: {err}") from None


def _concept(entry: Any, where: str, root: Path, needs_class_prompt: bool) -> Concept:
    """One checked :class:`Concept` of the file (``where``: how messages name it)."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: a concept is a mapping of keys ({', '.join(_KEYS)}), got {entry!r}")
    label = entry.get("name") or Path(str(entry.get("instance_data_dir") or "")).name or "?"
    here = f"{where} ({label!r})"
    for key in entry:
        if key not in _KEYS:
            raise DataError(f"{here}: unknown key {key!r}{_suggest(str(key), _KEYS)}")
    values: dict[str, Any] = {}
    for key in ("name", "instance_prompt", "class_prompt"):
        value = entry.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise DataError(f"{here}: {key} must be a non-blank string (got {value!r})")
        values[key] = value
    if values["instance_prompt"] is None:
        raise DataError(
            f"{here}: no instance_prompt; give the prompt of its photos, e.g. 'a photo of sks dog'"
        )
    for key in _FOLDERS:
        value = entry.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise DataError(f"{here}: {key} must be a folder path (got {value!r})")
        values[key] = root / Path(value).expanduser() if value is not None else None
    if values["instance_data_dir"] is None:
        raise DataError(f"{here}: no instance_data_dir; give the folder of its photos")
    for key in ("instance_data_dir", "mask_dir"):
        folder = values[key]
        if folder is not None and not folder.is_dir():
            missing = "is not a folder" if folder.exists() else "does not exist"
            raise DataError(f"{here}: its {key} {folder} {missing}")
    for key, default in (("repeats", 1), ("num_class_images", None)):
        value = entry.get(key, default)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise DataError(f"{here}: {key} must be an integer >= 1 (got {value!r})")
        values[key] = value
    if needs_class_prompt and values["class_prompt"] is None:
        raise DataError(
            f"{here}: no class_prompt; data.with_prior_preservation=true needs one per concept "
            "(e.g. 'a photo of a dog'), or set data.with_prior_preservation=false"
        )
    values["name"] = values["name"] or values["instance_data_dir"].name
    return Concept(**values, source=where)


def _suggest(key: str, valid: Any) -> str:
    """``; did you mean 'x'?`` for the closest valid key, as the config's messages say it."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def concept_images(concept: Concept, caption_extension: str = ".txt") -> list[Path]:
    """The readable photos of ``concept``'s instance folder (:func:`~.images.list_images`; a problem names
    the concept)."""
    try:
        return list_images(concept.instance_data_dir, "instance", caption_extension)
    except DataError as err:
        raise concept.problem(str(err)) from None
