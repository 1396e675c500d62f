"""The prompt-embedding file of ``data.cache_prompt_embeddings``: each training prompt's conditioning,
written atomically and read back only as what it says it is."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_file
from .images import DataError

PROMPT_EMBEDDINGS_NAME = "prompt_embeddings.safetensors"
"""The file of ``data.cache_prompt_embeddings``: the conditioning of every training prompt."""
PROMPT_EMBEDDINGS_FORMAT = "boft-diffusion prompt embeddings 1"


def save_prompt_embeddings(
    path: str | os.PathLike[str], embeddings: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str]
) -> Path:
    """Write ``{prompt: {key: tensor}}`` to the safetensors file ``path`` atomically.

    Tensor ``i/key`` is ``embeddings[prompts[i]][key]``; the metadata holds ``metadata``, the
    format and ``prompts`` (a JSON list)."""
    from safetensors.torch import save_file

    prompts = list(embeddings)
    tensors = {
        f"{i}/{key}": tensor.detach().cpu().contiguous()
        for i, prompt in enumerate(prompts)
        for key, tensor in embeddings[prompt].items()
    }
    meta = {**metadata, "format": PROMPT_EMBEDDINGS_FORMAT, "prompts": json.dumps(prompts)}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def read_prompt_embeddings_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a :func:`save_prompt_embeddings` file, ``prompts`` parsed into a list.

    A file that is not one raises :class:`DataError` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        if meta.get("format") != PROMPT_EMBEDDINGS_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        prompts = json.loads(meta["prompts"])
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts is not a list of strings")
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise DataError(
            f"{path} is not a prompt-embedding cache of boft-diffusion ({err}); remove it or move it away"
        ) from None
    return {**meta, "prompts": prompts}


def load_prompt_embeddings(
    path: str | os.PathLike[str],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """``({prompt: {key: tensor}}, metadata)`` of a :func:`save_prompt_embeddings` file (on the CPU)."""
    from safetensors.torch import load_file

    meta = read_prompt_embeddings_metadata(path)
    prompts = meta["prompts"]
    embeddings: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prompts}
    for name, tensor in load_file(str(path), device="cpu").items():
        index, _, key = name.partition("/")
        embeddings[prompts[int(index)]][key] = tensor
    return embeddings, meta
