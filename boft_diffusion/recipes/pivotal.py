"""Pivotal tuning: DreamBooth with new token embeddings for the subject, trained together with the BOFT
adapter (textual inversion + BOFT, as diffusers' advanced DreamBooth script offers for LoRA).

The word standing for the subject in the prompts (``pivotal.token_abstraction``, ``sks``) is replaced in
every prompt the run uses (instance prompt, validation and metrics prompts) by ``pivotal.num_new_tokens``
new tokens ``<s0><s1>...``, added to each text encoder's tokenizer. Their embedding rows start from
``pivotal.initializer_token``'s (or random rows of the vocabulary's scale) and train with the adapter; every
other row is held fixed (its gradient is masked and the embeddings train without weight decay, so
AdamW never moves those rows). The rows are trained state of the kind :mod:`boft_diffusion.recipes.tokens` registers:
they are saved in the same adapter file, in checkpoints and exact resume, and
``load_boft_weights(pipe, folder)`` adds the tokens to a fresh stock pipeline (``unload_boft`` removes
them again). Sample with ``"a photo of <s0><s1> toy"``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..training.args import ConfigError, TrainArgs
from ..training.card import CardParts
from ..training.recipe import TrainResult
from .dreambooth import DreamBoothConfig, DreamBoothRecipe
from .tokens import MAX_TOKENS, add_tokens, tokenizer_of

__all__ = ["CONFIG_CLASS", "PivotalArgs", "PivotalConfig", "PivotalRecipe", "run"]


@dataclass
class PivotalArgs:
    """The new tokens that stand for the subject."""

    token_abstraction: str = "sks"
    """The word in the prompts that stands for the subject; replaced by the new tokens in every prompt the run uses."""
    num_new_tokens: int = 2
    """New tokens per text encoder (<s0>, <s1>, ...; diffusers' advanced script uses 2)."""
    initializer_token: str | None = "toy"
    """A one-token word of the vocabulary every new token's embedding starts from (null: random rows with the
    vocabulary's standard deviation)."""

    def __post_init__(self) -> None:
        word = self.token_abstraction
        if not isinstance(word, str) or not re.fullmatch(r"\S+", word):
            raise ConfigError(f"pivotal.token_abstraction must be one word, got {word!r}")
        n = self.num_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_TOKENS:
            raise ConfigError(f"pivotal.num_new_tokens must be an integer in [1, {MAX_TOKENS}], got {n!r}")
        if self.initializer_token is not None and not str(self.initializer_token).strip():
            raise ConfigError("pivotal.initializer_token must be a word of the vocabulary, or null")

    @property
    def tokens(self) -> list[str]:
        return [f"<s{i}>" for i in range(self.num_new_tokens)]


@dataclass
class PivotalConfig(DreamBoothConfig):
    """A DreamBooth run that also trains new token embeddings for the subject."""

    train: TrainArgs = field(
        default_factory=lambda: TrainArgs(
            train_batch_size=4, max_train_steps=500, output_dir="outputs/pivotal-tiny"
        )
    )
    pivotal: PivotalArgs = field(default_factory=PivotalArgs)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.boft.train_text_encoder:
            raise ConfigError(
                "pivotal tuning trains token embeddings of the text encoder: it needs boft.train_text_encoder=true"
            )
        if self.data.dataset_file is not None:
            raise ConfigError(
                "pivotal tuning names one subject by new tokens: data.dataset_file (several concepts) is not "
                "supported with it yet; use train dreambooth"
            )
        word = self.pivotal.token_abstraction
        if not re.search(rf"(?<!\S){re.escape(word)}(?!\S)", self.data.instance_prompt):
            raise ConfigError(
                f"pivotal.token_abstraction {word!r} is not a word of data.instance_prompt "
                f"{self.data.instance_prompt!r}: it must name the subject there"
            )


PIVOTAL_KEYS = ("token_abstraction", "num_new_tokens", "initializer_token")
"""The ``pivotal.*`` keys the model card lists."""

CONFIG_CLASS = PivotalConfig
"""The recipe's config class (``boft-diffusion train pivotal`` loads it)."""


def with_tokens(cfg: PivotalConfig) -> PivotalConfig:
    """A copy of ``cfg`` whose instance, validation and metrics prompts name the new tokens instead of the
    token abstraction."""
    cfg = copy.deepcopy(cfg)
    pattern = re.compile(rf"(?<!\S){re.escape(cfg.pivotal.token_abstraction)}(?!\S)")
    joined = "".join(cfg.pivotal.tokens)

    def swap(prompt: str) -> str:
        return pattern.sub(joined, prompt)

    cfg.data.instance_prompt = swap(cfg.data.instance_prompt)
    cfg.validation.prompts = [swap(p) for p in cfg.validation.prompts]
    cfg.metrics.context_prompts = [swap(p) for p in cfg.metrics.context_prompts]
    return cfg


class PivotalRecipe(DreamBoothRecipe):
    """DreamBooth whose subject is named by new, trained tokens."""

    cfg: PivotalConfig
    recipe_name = "pivotal tuning"
    unshardable = "pivotal tuning trains rows of the text encoder's token embeddings, which FSDP would split"

    def __init__(self, cfg: PivotalConfig) -> None:
        super().__init__(with_tokens(cfg))
        self._embeddings: dict[str, tuple[nn.Parameter, int]] = {}
        """Per text encoder: its token-embedding weight and how many rows are new (the rest stay)."""

    def _encoders(self) -> list[str]:
        return [
            name for name in self.family.trained_text_encoders if getattr(self.pipe, name, None) is not None
        ]

    def check_pipeline(self) -> None:
        super().check_pipeline()
        if set(self._encoders()) != set(self.family.text_encoders):
            raise ConfigError(
                f"pivotal tuning adds tokens to every text encoder and trains them; {self.family.title} keeps "
                "a text encoder frozen: use a Stable Diffusion 1.x/2.x or SDXL model"
            )
        args = self.cfg.pivotal
        for name in self._encoders():
            tokenizer = getattr(self.pipe, tokenizer_of(name))
            present = [t for t in args.tokens if t in tokenizer.get_vocab()]
            if present:
                raise ConfigError(
                    f"pivotal: the new token(s) {present} are already in {tokenizer_of(name)}'s vocabulary; "
                    "load the base model without the textual inversion or adapter that added them"
                )
            if args.initializer_token is not None:
                self._initializer_id(tokenizer, name)

    def _initializer_id(self, tokenizer: Any, name: str) -> int:
        word = self.cfg.pivotal.initializer_token
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ConfigError(
                f"pivotal.initializer_token {word!r} is not one token of {tokenizer_of(name)}'s vocabulary "
                f"(it tokenizes to {len(ids)} tokens): give a single known word, or null for random rows"
            )
        return ids[0]

    def build(self) -> None:
        super().build()  # BOFT on the UNet and text encoders; the dataloader tokenizes lazily, per batch
        args, generator = self.cfg.pivotal, torch.Generator().manual_seed(self.cfg.train.seed)
        for name in self._encoders():
            encoder, tokenizer = self.components[name], getattr(self.pipe, tokenizer_of(name))
            weight = encoder.get_input_embeddings().weight
            if args.initializer_token is not None:
                start = weight[self._initializer_id(tokenizer, name)].detach().float().cpu()
                rows = start.expand(args.num_new_tokens, -1).clone()
            else:
                std = weight.detach().float().std().item()
                rows = torch.randn(args.num_new_tokens, weight.shape[1], generator=generator) * std
            ids = add_tokens(encoder, tokenizer, self.cfg.boft.adapter_name, args.tokens, rows)
            weight = encoder.get_input_embeddings().weight.requires_grad_(True)
            keep = torch.ones(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
            keep[ids] = False
            weight.register_hook(lambda grad, keep=keep: grad.masked_fill(keep, 0.0))
            self._embeddings[name] = (weight, len(ids))

    def parameter_groups(self, params: list[nn.Parameter]) -> list[Any]:
        """The token embeddings in a group without weight decay: their other rows get zero gradients, so
        AdamW leaves them exactly as they were (its moments stay zero), with no copy per step."""
        embeddings = {id(weight) for weight, _ in self._embeddings.values()}
        rest = [p for p in params if id(p) not in embeddings]
        rows = [p for p in params if id(p) in embeddings]
        return [{"params": rest}, {"params": rows, "weight_decay": 0.0}] if rows else rest

    def trainable_count(self) -> int:
        """BOFT's parameters and the new rows (the rest of the embedding matrix is held fixed)."""
        fixed = sum((weight.shape[0] - new) * weight.shape[1] for weight, new in self._embeddings.values())
        return super().trainable_count() - fixed

    def card_parts(self) -> CardParts:
        parts, args = super().card_parts(), self.cfg.pivotal
        return replace(
            parts,
            title=f"BOFT pivotal tuning: {self.cfg.data.instance_prompt}",
            description=f"{parts.description} The new tokens {''.join(args.tokens)} stand for the subject; "
            "`load_boft_weights` adds them to the pipeline's tokenizer and text encoder.",
            hyperparameters=(*parts.hyperparameters, *(f"pivotal.{k}" for k in PIVOTAL_KEYS)),
            tags=(*parts.tags, "textual-inversion", "pivotal-tuning"),
        )

    def adapter_metadata(self) -> dict[str, str]:
        return {**super().adapter_metadata(), "token_abstraction": self.cfg.pivotal.token_abstraction}


def run(cfg: PivotalConfig, on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train a BOFT adapter and new token embeddings for the subject as ``cfg`` says (see the module)."""
    return PivotalRecipe(cfg).run(on_step)
