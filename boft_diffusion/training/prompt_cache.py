"""Cached prompt embeddings (``data.cache_prompt_embeddings``): every training prompt encoded once by the frozen
text encoders, written to a file that a later run reuses only when it was made by the same model family,
text-encoder weights and prompts, and the encoders freed from training.

A recipe gives :class:`PromptCache` the file's place and its prompts; the family says what the conditioning
is (:meth:`~boft_diffusion.families.Family.encode_prompt`) and what of it depends on the batch's images
rather than its prompts (:attr:`~boft_diffusion.families.Family.per_batch_conditioning`, SDXL's time ids):
that part is never cached and is made for each batch by
:meth:`~boft_diffusion.families.Family.add_batch_conditioning`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import folder_write_problem
from ..data import DataError, load_prompt_embeddings, read_prompt_embeddings_metadata, save_prompt_embeddings
from ..families import Family
from ..pipeline import base_fingerprint
from .args import ConfigError
from .setup import record_outputs

__all__ = ["PromptCache", "encode_prompts", "read_prompt_cache"]

KEY = "data.cache_prompt_embeddings"


class PromptCache:
    """The prompt embeddings of one run: checked before anything is written (:meth:`check`), loaded or
    encoded once (:meth:`build`), handed out per batch (:meth:`conditioning`).

    ``path`` is the file; ``elsewhere`` the config key that moves it (named in a refusal, e.g.
    ``data.class_data_dir``).
    """

    def __init__(self, family: Family, pipe: Any, path: Path, elsewhere: str) -> None:
        self.family, self.pipe, self.path, self.elsewhere = family, pipe, path, elsewhere
        self.info: dict[str, str] = {}
        """What the file must have been made by (family, text-encoder fingerprint)."""
        self.reuse = False
        """Whether the file found by :meth:`check` is this run's (else the embeddings are computed)."""
        self.embeddings: dict[str, dict[str, torch.Tensor]] | None = None
        """Each prompt's conditioning (flattened keys, batch of 1, CPU) once built."""
        self.encoders_offloaded = False
        """Whether the text encoders wait in CPU memory (on an accelerator, after :meth:`build`)."""

    # --- check -------------------------------------------------------------------------------------
    def check(self, prompts: list[str], overwritten: bool) -> None:
        """A file already there (and not set aside by ``overwritten``) must be of this family, these encoders
        and these ``prompts`` (else a ConfigError saying which differs); a missing one must be writable.
        Nothing is written."""
        family, path = self.family, self.path
        self.info = {
            "family": family.name,
            "text_encoder_fingerprint": base_fingerprint(self.pipe, components=list(family.text_encoders)),
        }
        self.reuse = path.exists() and not overwritten
        if not self.reuse:
            problem = folder_write_problem(path.parent)
            if problem:
                raise ConfigError(f"{KEY}: the folder {path.parent} {problem}")
            return
        meta = read_prompt_embeddings_metadata(path)
        problems = []
        if meta.get("family") != family.name:
            problems.append(f"another model family ({meta.get('family')!r} there, {family.name!r} now)")
        elif meta.get("text_encoder_fingerprint") != self.info["text_encoder_fingerprint"]:
            problems.append(
                "other text-encoder weights (fingerprint "
                f"{meta.get('text_encoder_fingerprint')} there, {self.info['text_encoder_fingerprint']} "
                "now: another model, seed or revision)"
            )
        stored, now = set(meta["prompts"]), set(prompts)
        if stored != now:
            missing, extra = sorted(now - stored), sorted(stored - now)
            parts = (
                f"not there: {json.dumps(missing)}" if missing else "",
                f"not used now: {json.dumps(extra)}" if extra else "",
            )
            problems.append(f"other prompts ({'; '.join(p for p in parts if p)})")
        if problems:
            raise ConfigError(
                f"{KEY}: {path} holds prompt embeddings of {' and of '.join(problems)}; delete that file to "
                f"compute them anew, or use another {self.elsewhere}"
            )

    # --- build -------------------------------------------------------------------------------------
    def build(self, prompts: list[str], accelerator: Any, resolution: int, output_dir: Path) -> None:
        """Each prompt's conditioning, loaded from the checked file or encoded once and written (by the main
        process; a file inside ``output_dir`` is recorded as the run's output); then the text encoders are
        freed from training (moved to the CPU on an accelerator)."""
        family, path = self.family, self.path
        encoders = {name: getattr(self.pipe, name) for name in family.text_encoders}
        dtype = next(encoders[family.text_encoders[0]].parameters()).dtype
        if self.reuse:
            cache = read_prompt_cache(path)
            missing = [p for p in prompts if p not in cache]
            if missing:  # the instance folder's captions changed since the check
                raise ConfigError(f"{KEY}: {path} holds no embedding of {missing}")
            self.embeddings = {
                p: {k: v.to(dtype) if v.is_floating_point() else v for k, v in cache[p].items()}
                for p in prompts
            }
        else:
            tokenizers = family.tokenizers(self.pipe)
            self.embeddings = encode_prompts(
                family, encoders, tokenizers, prompts, accelerator.device, resolution
            )
            if accelerator.is_main_process:
                if path.resolve().is_relative_to(output_dir.resolve()):
                    record_outputs(output_dir, path)
                meta = {**self.info, "dtype": str(dtype).removeprefix("torch.")}
                save_prompt_embeddings(path, self.embeddings, meta)
            accelerator.wait_for_everyone()
        if accelerator.device.type != "cpu":
            for module in encoders.values():
                module.to("cpu")
            self.encoders_offloaded = True
            if accelerator.device.type == "cuda":
                torch.cuda.empty_cache()

    @contextlib.contextmanager
    def encoders_on(self, device: Any) -> Iterator[None]:
        """The offloaded text encoders back on ``device`` for the block (sampling calls the pipeline)."""
        if not self.encoders_offloaded:
            yield
            return
        encoders = [getattr(self.pipe, name) for name in self.family.text_encoders]
        for module in encoders:
            module.to(device)
        try:
            yield
        finally:
            for module in encoders:
                module.to("cpu")
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()

    # --- use ---------------------------------------------------------------------------------------
    def conditioning(self, batch: Mapping[str, Any], device: Any) -> dict[str, Any]:
        """The conditioning ``family.encode_prompt`` gives ``batch``, from the cache: each sample's prompt's
        tensors, stacked, completed by the family with what depends on the batch's images."""
        if self.embeddings is None:
            raise RuntimeError("the prompt cache is used before it was built")
        return cached_conditioning(self.family, self.embeddings, batch, device)


def cached_conditioning(
    family: Family,
    embeddings: Mapping[str, Mapping[str, torch.Tensor]],
    batch: Mapping[str, Any],
    device: Any,
) -> dict[str, Any]:
    """``batch["prompts"]``' cached ``embeddings`` stacked on ``device``, nested again, and completed by
    ``family.add_batch_conditioning``."""
    rows = [embeddings[prompt] for prompt in batch["prompts"]]
    flat = {key: torch.cat([row[key] for row in rows]).to(device) for key in rows[0]}
    return family.add_batch_conditioning(_unflatten(flat), batch, device)


def read_prompt_cache(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The embeddings of the checked cache file; tensors named for no prompt it lists (an index out of its
    list, or none) are a ConfigError naming the file. Its metadata chooses nothing: prompts are keys."""
    try:
        return load_prompt_embeddings(path)[0]
    except DataError:  # not a cache file at all: its own message
        raise
    except (IndexError, ValueError) as err:
        raise ConfigError(
            f"{KEY}: {path} holds tensors of no prompt it lists ({err}); delete that file to compute the "
            "embeddings anew"
        ) from None


@torch.no_grad()
def encode_prompts(
    family: Family,
    encoders: Mapping[str, nn.Module],
    tokenizers: Mapping[str, Any],
    prompts: list[str],
    device: Any,
    resolution: int,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{prompt: conditioning}``: ``family.encode_prompt`` of each prompt alone (batch of 1) with the frozen
    ``encoders`` in eval mode, nested keys flattened (``added_cond_kwargs.text_embeds``), on the CPU, less
    the family's :attr:`~boft_diffusion.families.Family.per_batch_conditioning`."""
    modes = {name: module.training for name, module in encoders.items()}
    for module in encoders.values():
        module.eval()
    try:
        cache = {}
        for prompt in prompts:
            batch = dict(family.tokenize(tokenizers, [prompt]))
            batch["pixel_values"] = torch.zeros(()).expand(1, 3, resolution, resolution)  # its size only
            conditioning = family.encode_prompt(encoders, batch, device)
            cache[prompt] = {
                key: value.detach().cpu()
                for key, value in _flatten(conditioning).items()
                if key not in family.per_batch_conditioning
            }
        return cache
    finally:
        for name, module in encoders.items():
            module.train(modes[name])


def _flatten(conditioning: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in conditioning.items():
        if isinstance(value, Mapping):
            flat |= _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor):
            flat[f"{prefix}{key}"] = value
        else:
            raise TypeError(f"conditioning {prefix}{key} is a {type(value).__name__}, not a tensor")
    return flat


def _unflatten(flat: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested
