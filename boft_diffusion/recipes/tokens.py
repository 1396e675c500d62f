"""New token embeddings as trained state: what pivotal tuning (:mod:`boft_diffusion.recipes.pivotal`) trains
besides the BOFT adapter, registered through the one door (:mod:`boft_diffusion.trained_state`).

New tokens (``<s0>``, ``<s1>``, ...) are added to a text encoder's tokenizer and their rows appended to the
encoder's input embeddings; the rows are trained and saved in the adapter file as
``state.token_embeddings.<text encoder>``, shape ``(number of tokens, embedding width)``, with the metadata
key :data:`TOKENS_METADATA` (JSON ``{text encoder: [token, ...]}``). Loading adds them to a fresh stock
pipeline; :func:`~boft_diffusion.unload_boft` and :func:`~boft_diffusion.delete_boft_adapter` take them
off again (through diffusers' own ``unload_textual_inversion``), so the pipeline is as it was.

Which tokens an adapter added is kept on the text encoder module (a plain attribute naming the tokens and
their tokenizer), so checkpoints, which see the trained modules only, save and restore the rows too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..io.format import AdapterFile, AdapterFormatError
from ..pipeline import pipeline_components
from ..trained_state import Attachment, SavedState, TrainedState, register_trained_state

__all__ = [
    "TOKENS_METADATA",
    "TOKEN_EMBEDDINGS",
    "TokenEmbeddings",
    "add_tokens",
    "new_tokens",
    "remove_tokens",
    "token_ids",
]

TOKENS_METADATA = "token_embeddings"
"""Adapter metadata key: JSON ``{text encoder component: [token, ...]}``, one token per saved row."""
_RECORD = "_boft_new_tokens"
"""Attribute of a text encoder: ``{adapter name: (tokens, tokenizer)}``."""
MAX_TOKENS = 64
"""At most this many new tokens per text encoder in one file."""
STOCK_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
"""Keys of diffusers' textual-inversion file (its advanced DreamBooth script's ``*_emb.safetensors``)."""


def tokenizer_of(encoder: str) -> str:
    """The tokenizer component of a text encoder component (``text_encoder_2`` -> ``tokenizer_2``)."""
    return encoder.replace("text_encoder", "tokenizer")


def _records(text_encoder: Any) -> dict[str, tuple[list[str], Any]]:
    return getattr(text_encoder, _RECORD, None) or {}


def new_tokens(text_encoder: nn.Module, adapter_name: str) -> list[str]:
    """The tokens adapter ``adapter_name`` added to ``text_encoder`` (empty: none)."""
    return list(_records(text_encoder).get(adapter_name, ((), None))[0])


def token_ids(text_encoder: nn.Module, adapter_name: str) -> list[int]:
    """Their ids in the tokenizer they were added to (looked up now: removing other tokens renumbers)."""
    tokens, tokenizer = _records(text_encoder).get(adapter_name, ([], None))
    return list(tokenizer.convert_tokens_to_ids(tokens)) if tokens else []


def _embedding(text_encoder: nn.Module) -> nn.Embedding:
    return text_encoder.get_input_embeddings()


def add_tokens(
    text_encoder: nn.Module, tokenizer: Any, adapter_name: str, tokens: Sequence[str], rows: torch.Tensor
) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` and their ``rows`` ``(len(tokens), width)`` to ``text_encoder``'s input
    embeddings as adapter ``adapter_name``'s; returns their ids. Check first with :func:`token_problem`."""
    embedding = _embedding(text_encoder)
    frozen = not embedding.weight.requires_grad
    before = embedding.num_embeddings
    tokenizer.add_tokens(list(tokens))
    ids = list(tokenizer.convert_tokens_to_ids(list(tokens)))
    text_encoder.resize_token_embeddings(max(before, max(ids) + 1), mean_resizing=False)
    weight = _embedding(text_encoder).weight
    with torch.no_grad():
        weight[ids] = rows.to(device=weight.device, dtype=weight.dtype)
    weight.requires_grad_(not frozen)
    records = dict(_records(text_encoder))
    records[adapter_name] = (list(tokens), tokenizer)
    setattr(text_encoder, _RECORD, records)
    return ids


def remove_tokens(text_encoder: nn.Module, adapter_name: str | None = None) -> None:
    """Take adapter ``adapter_name``'s tokens (``None``: every adapter's) off the text encoder and its
    tokenizer, with diffusers' ``unload_textual_inversion`` (other added tokens are renumbered, as it does)."""
    from diffusers.loaders import TextualInversionLoaderMixin

    records = dict(_records(text_encoder))
    for name in [n for n in records if adapter_name is None or n == adapter_name]:
        tokens, tokenizer = records.pop(name)
        frozen = not _embedding(text_encoder).weight.requires_grad
        TextualInversionLoaderMixin.unload_textual_inversion(
            None, tokens=tokens, tokenizer=tokenizer, text_encoder=text_encoder
        )
        _embedding(text_encoder).weight.requires_grad_(not frozen)
        text_encoder.config.vocab_size = _embedding(text_encoder).num_embeddings
    setattr(text_encoder, _RECORD, records)


def token_problem(tokenizer: Any, text_encoder: nn.Module, tokens: Sequence[str], rows: Any) -> str | None:
    """Why ``tokens`` with embeddings ``rows`` cannot be added to this tokenizer and text encoder, or ``None``."""
    width = _embedding(text_encoder).embedding_dim
    shape = tuple(getattr(rows, "shape", ()))
    if shape != (len(tokens), width):
        return (
            f"embeddings of shape {shape} for {len(tokens)} token(s); the text encoder's embeddings are "
            f"{width} wide, so ({len(tokens)}, {width}) fits"
        )
    vocabulary = tokenizer.get_vocab()
    present = [t for t in tokens if t in vocabulary]
    if present:
        return f"token(s) {present} are already in the tokenizer: unload the adapter or textual inversion that added them"
    return None


def _file_tokens(adapter: AdapterFile) -> dict[str, list[str]]:
    """The file's ``{text encoder: tokens}``, checked for type against its tensors; nothing is built."""
    try:
        record = json.loads(adapter.metadata.get(TOKENS_METADATA, "null"))
    except (ValueError, RecursionError):
        record = None
    tensors = adapter.states.get(TOKEN_EMBEDDINGS.name, {})
    if not isinstance(record, dict) or set(record) != set(tensors):
        raise AdapterFormatError(
            f"{adapter.source}: invalid token embeddings (its {TOKENS_METADATA!r} metadata must name the tokens "
            f"of each text encoder it holds embeddings for: {sorted(tensors)})"
        )
    for encoder, tokens in record.items():
        if (
            not isinstance(tokens, list)
            or not 0 < len(tokens) <= MAX_TOKENS
            or not all(isinstance(t, str) and 0 < len(t) <= 100 and not t.isspace() for t in tokens)
            or len(set(tokens)) != len(tokens)
        ):
            raise AdapterFormatError(
                f"{adapter.source}: invalid token embeddings ({encoder}: the tokens must be 1 to {MAX_TOKENS} "
                "distinct non-blank strings)"
            )
    return record


class TokenEmbeddings(TrainedState):
    """New tokens and their trained embedding rows, per text encoder."""

    name = "token_embeddings"

    def collect(self, pipe: Any, adapter_name: str, configs: Mapping[str, Any]) -> SavedState | None:
        tensors, record = {}, {}
        for comp, module in pipeline_components(pipe).items():
            ids = token_ids(module, adapter_name) if comp.startswith("text_encoder") else []
            if ids:
                weight = _embedding(module).weight
                whole = weight.full_tensor() if hasattr(weight, "full_tensor") else weight  # FSDP2: gathered
                tensors[comp] = whole[ids].detach()
                record[comp] = new_tokens(module, adapter_name)
        if not tensors:
            return None
        return SavedState(tensors, {TOKENS_METADATA: json.dumps(record, sort_keys=True)})

    def prepare(
        self, pipe: Any, adapter: AdapterFile, adapter_name: str, options: Mapping[str, Any]
    ) -> Attachment | None:
        record = _file_tokens(adapter)
        rows = adapter.states[self.name]
        targets = []
        for encoder, tokens in record.items():
            text_encoder = getattr(pipe, encoder, None)
            tokenizer = getattr(pipe, tokenizer_of(encoder), None)
            if not isinstance(text_encoder, nn.Module) or tokenizer is None:
                raise AdapterFormatError(
                    f"{adapter.source}: has token embeddings for {encoder}, the pipeline has no such text "
                    "encoder and tokenizer"
                )
            problem = token_problem(tokenizer, text_encoder, tokens, rows[encoder])
            if problem:
                raise AdapterFormatError(
                    f"{adapter.source}: its token embeddings do not fit {encoder}: {problem}"
                )
            targets.append((text_encoder, tokenizer, tokens, rows[encoder]))

        def attach() -> None:
            for text_encoder, tokenizer, tokens, values in targets:
                add_tokens(text_encoder, tokenizer, adapter_name, tokens, values)

        def detach() -> None:
            for text_encoder, *_ in targets:
                remove_tokens(text_encoder, adapter_name)

        return Attachment(attach, detach)

    def restore(self, components: Mapping[str, Any], adapter: AdapterFile, adapter_name: str) -> None:
        record = _file_tokens(adapter)
        for encoder, tokens in record.items():
            module = components.get(encoder)
            if module is None or new_tokens(module, adapter_name) != tokens:
                have = new_tokens(module, adapter_name) if module is not None else []
                raise ValueError(f"{encoder} holds the new tokens {have}, the checkpoint {tokens}")
            weight = _embedding(module).weight
            with torch.no_grad():
                weight[token_ids(module, adapter_name)] = adapter.states[self.name][encoder].to(weight)

    def remove(self, pipe: Any, adapter_name: str | None = None) -> None:
        for comp, module in pipeline_components(pipe).items():
            if comp.startswith("text_encoder") and _records(module):
                remove_tokens(module, adapter_name)

    def stock_files(self, adapter: AdapterFile) -> dict[str, dict[str, torch.Tensor]]:
        """diffusers' advanced DreamBooth layout: one file, ``clip_l`` (``text_encoder``) and ``clip_g``
        (``text_encoder_2``) rows; ``pipe.load_textual_inversion(state["clip_l"], token=[...])`` loads them."""
        record = _file_tokens(adapter)
        rows = adapter.states[self.name]
        return {"_emb": {STOCK_KEYS.get(encoder, encoder): rows[encoder] for encoder in record}}

    def load_stock_files(self, pipe: Any, adapter: AdapterFile, files: Mapping[str, Any]) -> None:
        from safetensors.torch import load_file

        state = load_file(str(files["_emb"]))
        for encoder, tokens in _file_tokens(adapter).items():
            key = STOCK_KEYS.get(encoder, encoder)
            if key in state:
                pipe.load_textual_inversion(
                    state[key], token=tokens, text_encoder=getattr(pipe, encoder),
                    tokenizer=getattr(pipe, tokenizer_of(encoder)),
                )  # fmt: skip


TOKEN_EMBEDDINGS = register_trained_state(TokenEmbeddings())
