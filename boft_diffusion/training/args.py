"""Typed training configuration: dataclasses shared by every recipe, loaded with omegaconf.

Each field carries its documentation as an attribute docstring; :func:`field_docs` reads them for
``--help``. A recipe composes these sections with its own data section into one config class, e.g.
``DreamBoothConfig(model, boft, data, optim, train, validation)``; keys are addressed as
``section.field`` in YAML files and in ``key=value`` command-line overrides.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ..config import BOFTConfig
from ..families import FAMILIES
from ..inject import TEXT_ENCODER_TARGETS, UNET_ATTENTION_TARGETS

__all__ = [
    "BOFTArgs",
    "ConfigError",
    "DataArgs",
    "ModelArgs",
    "OptimArgs",
    "QuantizationArgs",
    "RecipeConfig",
    "TrainArgs",
    "ValidationArgs",
    "config_keys",
    "config_to_dict",
    "config_to_yaml",
    "field_docs",
    "load_config",
    "with_world_weights",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration the run cannot start with; the message names the key and how to fix it."""


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise :class:`ConfigError` naming ``key`` and the rule it breaks unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} must be {rule} (got {value!r})")


def _finite(value: Any) -> bool:
    """A real number that is neither NaN nor infinite (the comparisons after it then mean what they say)."""
    return isinstance(value, int | float) and math.isfinite(value)


def _one_of(names: Sequence[str]) -> str:
    """``a, b or c``."""
    return " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


def with_world_weights() -> str:
    """The families whose tiny pipeline has world weights (``sd``), as messages name them."""
    return _one_of([name for name, family in FAMILIES.items() if "world" in family.tiny_weights])


def _check_seed(key: str, value: int) -> None:
    _require(0 <= value < 2**32, key, "in [0, 2**32)", value)  # numpy's range (set_seed seeds numpy too)


def _check_logging_dir(value: str) -> None:
    """A folder inside output_dir: relative, without ``..`` (overwrite may remove it; it must be ours)."""
    path = PurePath(value)
    if path.is_absolute() or ".." in path.parts or not path.parts or value.startswith("~"):
        raise ConfigError(
            f"train.logging_dir must be a folder inside train.output_dir: a relative path without '..' "
            f"(got {value!r}; e.g. logs)"
        )


QUANTIZATION_BACKENDS = (
    "none",
    "bnb-nf4",
    "bnb-int8",
    "torchao-int8",
    "torchao-fp8",
    "quanto-int8",
    "quanto-fp8",
)
QUANTIZABLE_COMPONENTS = ("denoiser", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class QuantizationArgs:
    """A quantized base: the frozen weights stored in 8 or 4 bits, BOFT's rotation applied in front of them."""

    backend: Literal[
        "none", "bnb-nf4", "bnb-int8", "torchao-int8", "torchao-fp8", "quanto-int8", "quanto-fp8"
    ] = "none"
    """none, or how the components below are loaded: bnb-nf4 / bnb-int8 (bitsandbytes; diffusers' loader needs a
    CUDA or XPU device), torchao-int8 / torchao-fp8 (weight-only; fp8 computes in the input's dtype), quanto-int8 /
    quanto-fp8 (optimum-quanto). Each through diffusers' quantization config of that library."""
    components: list[str] = field(default_factory=lambda: ["denoiser"])
    """Which components to quantize: denoiser (the UNet or transformer) and any of text_encoder, text_encoder_2,
    text_encoder_3 the model has."""

    def __post_init__(self) -> None:
        _require(self.backend in QUANTIZATION_BACKENDS, "model.quantization.backend", _one_of(QUANTIZATION_BACKENDS),
                 self.backend)  # fmt: skip
        components = list(self.components)
        bad = [c for c in components if c not in QUANTIZABLE_COMPONENTS]
        _require(
            not bad, "model.quantization.components", f"a list of {_one_of(QUANTIZABLE_COMPONENTS)}", bad
        )
        _require(len(set(components)) == len(components), "model.quantization.components", "without repeats",
                 components)  # fmt: skip
        _require(bool(components) or self.backend == "none", "model.quantization.components",
                 "not empty with a backend", components)  # fmt: skip


@dataclass
class ModelArgs:
    """The base pipeline to finetune."""

    pretrained_model_name_or_path: str | None = None
    """Local diffusers folder or hub id of a pipeline of a supported family (SD 1.x/2.x, SDXL); null: the embedded
    tiny pipeline."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the base model."""
    variant: str | None = None
    """Weight file variant to load, e.g. ``fp16``."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """Override the scheduler's prediction type (null: keep the model's, e.g. v_prediction for SD 2.1-768)."""
    tiny_weights: Literal["world", "random"] | None = None
    """The embedded tiny pipeline's weights (only without pretrained_model_name_or_path): world (pretrained on
    the procedural world, shipped in the package) or random (initialised from tiny_seed; learns nothing real);
    null: world for tiny_family=sd, random for the others (the only weights they have)."""
    tiny_seed: int = 0
    """Seed of the random tiny pipeline (tiny_weights=random) and of the generated instance images."""
    tiny_family: str = "sd"
    """Model family of the embedded tiny pipeline, a name in boft_diffusion.families.FAMILIES (sd, sdxl, sd3,
    flux, flux2): sd is the Stable Diffusion 1.x shape with world or random weights, the others have random
    weights, chosen by default (stock component classes in tiny configs, boft_diffusion.tiny)."""

    quantization: QuantizationArgs = field(default_factory=QuantizationArgs)
    """A quantized base (backend none: full precision)."""

    def __post_init__(self) -> None:
        _check_seed("model.tiny_seed", self.tiny_seed)
        _require(self.tiny_family in FAMILIES, "model.tiny_family", _one_of(list(FAMILIES)), self.tiny_family)
        _require(
            self.tiny_weights in ("world", "random", None),
            "model.tiny_weights",
            "world, random or null",
            self.tiny_weights,
        )
        has = FAMILIES[self.tiny_family].tiny_weights
        if self.pretrained_model_name_or_path is None:
            _require(
                self.tiny_weights in (None, *has),
                "model.tiny_weights",
                f"{_one_of(has)} or null for model.tiny_family={self.tiny_family} (only the "
                f"{with_world_weights()}-shaped tiny pipeline has world weights)",
                self.tiny_weights,
            )
        if self.pretrained_model_name_or_path is None and self.tiny_pipeline_weights == "world":
            _require(
                self.prediction_type in (None, "epsilon"),
                "model.prediction_type",
                "epsilon or null for the pretrained tiny pipeline (it predicts noise; "
                "model.tiny_weights=random takes v_prediction)",
                self.prediction_type,
            )

    @property
    def tiny_pipeline_weights(self) -> Literal["world", "random"]:
        """The weights the embedded tiny pipeline is built with: ``tiny_weights``, or for null the family's
        default (world for sd, random for the others)."""
        if self.tiny_weights is not None:
            return self.tiny_weights
        return FAMILIES[self.tiny_family].tiny_weights[0]

    @property
    def name(self) -> str:
        """The base model as a model card and an adapter's metadata name it."""
        if self.pretrained_model_name_or_path:
            return self.pretrained_model_name_or_path
        if self.tiny_pipeline_weights == "world":
            return "boft_diffusion.tiny (world)"
        family = "" if self.tiny_family == "sd" else f"{self.tiny_family}, "
        return f"boft_diffusion.tiny ({family}random, seed {self.tiny_seed})"


@dataclass
class BOFTArgs:
    """The BOFT adapter (paper notation: block size b, block number r, butterfly factors m)."""

    block_size: int = 0
    """Block size b (0: derived per layer from block_num)."""
    block_num: int = 4
    """Number of blocks r per butterfly factor (0: derived per layer from block_size)."""
    n_butterfly_factor: int = 2
    """Number m of butterfly factors; 1 is plain block-diagonal OFT."""
    dropout: float = 0.1
    """Multiplicative dropout: probability of replacing a block by the identity during training."""
    bias: Literal["none", "all", "boft_only"] = "boft_only"
    """Biases that train: none, all, or boft_only (those of the adapted layers)."""
    unet_target_modules: list[str] = field(default_factory=lambda: list(UNET_ATTENTION_TARGETS))
    """UNet module-name suffixes to adapt."""
    transformer_target_modules: list[str] | None = None
    """Transformer module-name suffixes to adapt (SD3, Flux); null: the family's preset, every attention's
    image and text projections (to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out)."""
    train_text_encoder: bool = True
    """Also adapt the text encoder (its BOFT parameters train with the UNet's)."""
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(TEXT_ENCODER_TARGETS))
    """Text-encoder module-name suffixes to adapt (with train_text_encoder)."""
    adapter_name: str = "default"
    """Name of the adapter in the saved file."""

    def __post_init__(self) -> None:
        _require(_finite(self.dropout) and 0 <= self.dropout < 1, "boft.dropout", "in [0, 1)", self.dropout)
        self.to_config(self.unet_target_modules)  # raises on an invalid combination

    def to_config(self, target_modules: list[str]) -> BOFTConfig:
        return BOFTConfig(
            boft_block_size=self.block_size,
            boft_block_num=self.block_num,
            boft_n_butterfly_factor=self.n_butterfly_factor,
            boft_dropout=self.dropout,
            bias=self.bias,
            target_modules=list(target_modules),
        )


@dataclass
class OptimArgs:
    """Optimiser, learning-rate schedule and gradient clipping."""

    learning_rate: float = 2e-3
    """Peak learning rate (SD: 3e-5 as in the BOFT paper; the tiny model: 2e-3)."""
    scale_lr: bool = False
    """Multiply the learning rate by batch size x gradient accumulation x number of processes."""
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "constant"
    """Schedule (diffusers.optimization.get_scheduler): linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup."""
    lr_warmup_steps: int = 0
    """Linear warmup steps."""
    lr_num_cycles: int = 1
    """Hard restarts of cosine_with_restarts."""
    lr_power: float = 1.0
    """Power of the polynomial schedule."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """adamw (torch) or adamw_8bit (bitsandbytes, must be installed)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_weight_decay: float = 1e-2
    """AdamW decoupled weight decay."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm of the trained parameters to this (null or 0: no clipping)."""

    def __post_init__(self) -> None:
        lr = self.learning_rate
        _require(_finite(lr) and lr > 0, "optim.learning_rate", "a finite number > 0", lr)
        for name in ("adam_beta1", "adam_beta2"):
            beta = getattr(self, name)
            _require(_finite(beta) and 0 <= beta < 1, f"optim.{name}", "in [0, 1)", beta)
        for name in ("adam_epsilon", "adam_weight_decay", "lr_power"):
            value = getattr(self, name)
            _require(_finite(value) and value >= 0, f"optim.{name}", "a finite number >= 0", value)
        _require(self.lr_warmup_steps >= 0, "optim.lr_warmup_steps", ">= 0", self.lr_warmup_steps)
        _require(self.lr_num_cycles >= 1, "optim.lr_num_cycles", ">= 1", self.lr_num_cycles)
        clip = self.max_grad_norm
        _require(
            clip is None or (_finite(clip) and clip >= 0),
            "optim.max_grad_norm",
            "a finite number >= 0 or null",
            clip,
        )


@dataclass
class TrainArgs:
    """The run: where it writes, how long it trains, precision, memory, checkpoints and logging."""

    output_dir: str = "outputs/dreambooth-tiny"
    """Folder of the run: adapter, config, model card, checkpoints, validation grids, logs."""
    overwrite_output_dir: bool = False
    """Allow output_dir to hold a different run: what earlier runs recorded there (checkpoints, grids, logs, ...) is removed once this run has started; other files stay."""
    seed: int = 0
    """Seed of everything random (data order, augmentation, noise, dropout); each process adds its rank."""
    train_batch_size: int = 1
    """Instance images per process per step (doubled by class images with prior preservation)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated into one optimiser step."""
    max_train_steps: int | None = 300
    """Optimiser steps to train (null: num_train_epochs decides)."""
    num_train_epochs: int = 1
    """Epochs to train when max_train_steps is null."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Compute precision; frozen weights are stored in it, BOFT parameters stay float32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    enable_xformers_memory_efficient_attention: bool = False
    """Use xformers attention in the UNet (needs xformers and CUDA)."""
    allow_tf32: bool = False
    """Allow TF32 matmuls on Ampere+ GPUs."""
    snr_gamma: float | None = None
    """Min-SNR loss weighting gamma (5.0 is the paper's value; null: plain MSE). DDPM families (SD, SDXL) only."""
    weighting_scheme: Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"] = "none"
    """Flow-matching families (SD3, Flux): how training timesteps are drawn (none: uniform; logit_normal, mode)
    or the loss weighted (sigma_sqrt, cosmap), as in diffusers' training_utils."""
    logit_mean: float = 0.0
    """Mean of the logit-normal timestep density (weighting_scheme=logit_normal)."""
    logit_std: float = 1.0
    """Standard deviation of the logit-normal timestep density."""
    mode_scale: float = 1.29
    """Scale of the mode timestep density (weighting_scheme=mode)."""
    guidance_scale: float = 3.5
    """Guidance value fed to guidance-distilled denoisers while training (FLUX.1-dev's guidance embedding)."""
    noise_offset: float = 0.0
    """Offset noise scale (e.g. 0.1) for darker/brighter images."""
    dataloader_num_workers: int = 0
    """Data-loading worker processes (0: load in the main process)."""
    checkpointing_steps: int = 100
    """Save a full training state every N steps (0: never)."""
    checkpoints_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest removed; null: keep all)."""
    resume_from_checkpoint: str | None = None
    """Checkpoint folder to resume from, or ``latest`` (the newest in output_dir; none there: start fresh)."""
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """Tracker for loss, learning rate and validation grids (wandb honours WANDB_MODE=offline)."""
    tracker_project_name: str = "boft-diffusion"
    """Project name in the tracker."""
    logging_dir: str = "logs"
    """Tracker folder, relative to output_dir (and inside it)."""
    export_merged: bool = False
    """After training, also write the merged model to output_dir/merged (boft_diffusion.export)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the trained tensors with this decay (e.g. 0.999; 0: off). Validation and metrics use the average; it is saved as output_dir/ema/boft_weights.safetensors beside the raw adapter, and in checkpoints (a resume restores it exactly)."""
    ema_on_cpu: bool = False
    """Keep the moving average in CPU memory instead of the accelerator's."""

    def __post_init__(self) -> None:
        _require(
            _finite(self.ema_decay) and 0.0 <= self.ema_decay < 1.0, "train.ema_decay",
            "a number in [0, 1) (0: no EMA)", self.ema_decay,
        )  # fmt: skip
        positive = ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ConfigError(f"train.max_train_steps must be >= 1 or null (got {self.max_train_steps})")
        if self.checkpointing_steps < 0:
            raise ConfigError(f"train.checkpointing_steps must be >= 0 (got {self.checkpointing_steps})")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError(
                f"train.checkpoints_total_limit must be >= 1 or null (got {self.checkpoints_total_limit})"
            )
        _check_seed("train.seed", self.seed)
        gamma, offset = self.snr_gamma, self.noise_offset
        _require(
            gamma is None or (_finite(gamma) and gamma > 0),
            "train.snr_gamma",
            "a finite number > 0 or null",
            gamma,
        )
        _require(_finite(offset) and offset >= 0, "train.noise_offset", "a finite number >= 0", offset)
        workers = self.dataloader_num_workers
        _require(workers >= 0, "train.dataloader_num_workers", ">= 0", workers)
        _check_logging_dir(self.logging_dir)


@dataclass
class ValidationArgs:
    """Periodic sampling with fixed seeds into PNG grids (one row per prompt)."""

    prompts: list[str] = field(
        default_factory=lambda: ["a photo of sks toy", "a photo of sks toy on a blue background"]
    )
    """Prompts to sample (empty: no validation and no sample grid)."""
    validation_steps: int = 100
    """Sample every N steps (0: only after training)."""
    num_images_per_prompt: int = 2
    """Images per prompt (grid columns); image j uses seed + j."""
    seed: int = 0
    """Seed of the first image of each row."""
    num_inference_steps: int = 20
    """Sampler steps."""
    guidance_scale: float = 4.0
    """Classifier-free guidance scale."""
    resolution: int | None = None
    """Image size in pixels, a multiple of 8 (null: the training resolution)."""

    def __post_init__(self) -> None:
        if self.validation_steps < 0 or self.num_images_per_prompt < 1 or self.num_inference_steps < 1:
            raise ConfigError(
                "validation.validation_steps must be >= 0, num_images_per_prompt and num_inference_steps >= 1"
            )
        _check_seed("validation.seed", self.seed)
        _require(
            _finite(self.guidance_scale), "validation.guidance_scale", "a finite number", self.guidance_scale
        )
        size = self.resolution
        _require(
            size is None or (size >= 8 and size % 8 == 0),
            "validation.resolution",
            "a positive multiple of 8 or null (Stable Diffusion pipelines sample only such sizes)",
            size,
        )


# --- loading ------------------------------------------------------------------------------------
@dataclass
class DataArgs:
    """The data section every recipe's extends: what the shared training parts read of it."""

    resolution: int = 64
    """Training image size in pixels (square; a multiple of 8; the tiny pipeline's native size is 64)."""

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"data.resolution must be a positive multiple of 8 (got {self.resolution})")


@dataclass
class RecipeConfig:
    """The sections every recipe's config has; a recipe's config extends it (narrowing ``data``, ``boft``,
    ``validation`` to its own classes and adding its sections). :class:`~boft_diffusion.training.recipe.TrainingRecipe`
    reads only these."""

    model: ModelArgs = field(default_factory=ModelArgs)
    boft: BOFTArgs = field(default_factory=BOFTArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    validation: ValidationArgs = field(default_factory=ValidationArgs)


def config_keys(cls: type) -> list[str]:
    """Every leaf key of a (nested) config dataclass as a dotted path, in declaration order."""
    keys = []
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(cls, f.name)
        if sub:
            keys.extend(f"{f.name}.{k}" for k in config_keys(sub))
        else:
            keys.append(f.name)
    return keys


def _dataclass_type(cls: type, name: str) -> type | None:
    hint = _type_hints(cls).get(name)
    return hint if dataclasses.is_dataclass(hint) else None


@cache
def _type_hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _suggest(key: str, valid: Sequence[str]) -> str:
    """``; did you mean 'x'?`` for the closest valid key (by full path, then by last name)."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in valid if k.rsplit(".", 1)[-1] == leaf]
    if len(same_leaf) == 1:
        return f"; did you mean {same_leaf[0]!r}?"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not close:
        leaves = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = [leaves[c] for c in difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)]
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown_keys(cls: type, data: Any, prefix: str = "") -> list[str]:
    """Dotted keys of ``data`` (a nested dict) that ``cls`` does not have."""
    if not isinstance(data, dict):
        return []
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            unknown.extend(_leaf_paths(value, path))
        elif sub := _dataclass_type(cls, key):
            unknown.extend(_unknown_keys(sub, value, path + "."))
    return unknown


def _leaf_paths(value: Any, path: str) -> list[str]:
    if not isinstance(value, dict) or not value:
        return [path]
    return [leaf for key, sub in value.items() for leaf in _leaf_paths(sub, f"{path}.{key}")]


def _parse_overrides(overrides: Sequence[str]) -> Any:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"Override {item!r} is not of the form key=value (e.g. optim.learning_rate=1e-4)"
            )
    return OmegaConf.from_dotlist(list(overrides))


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Dataclass defaults, then the YAML file, then ``key=value`` overrides; a typed, validated ``cls``.

    Unknown keys, values of the wrong type and invalid combinations raise :class:`ConfigError`
    naming the key, its source and the closest valid key.
    """
    sources = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist")
        try:
            sources.append((f"config file {path}", OmegaConf.load(path)))
        except (OmegaConfBaseException, yaml.YAMLError, ValueError) as err:
            raise ConfigError(f"Config file {path} is not valid YAML: {err}") from err
        if not OmegaConf.is_dict(sources[-1][1]):
            raise ConfigError(f"Config file {path} must hold a mapping of sections (model:, train:, ...)")
    sources.append(("command line", _parse_overrides(overrides)))
    merged = OmegaConf.structured(cls)
    valid = config_keys(cls)
    for source, data in sources:
        unknown = _unknown_keys(cls, OmegaConf.to_container(data))
        if unknown:
            raise ConfigError(f"Unknown config key {unknown[0]!r} in {source}{_suggest(unknown[0], valid)}")
        try:
            merged = OmegaConf.merge(merged, data)
        except ConfigKeyError as err:
            raise ConfigError(f"Unknown config key {err.full_key!r} in {source}") from err
        except ValidationError as err:
            message = str(err.msg).splitlines()[0]
            raise ConfigError(f"Invalid value for {err.full_key!r} in {source}: {message}") from err
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"Invalid config: {getattr(err, 'msg', err)}") from err
    except ValueError as err:  # __post_init__ checks
        raise err if isinstance(err, ConfigError) else ConfigError(str(err)) from err


def config_to_dict(config: Any) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(config))


def config_to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


# --- documentation ------------------------------------------------------------------------------
def _attribute_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal under each annotated field of ``cls``."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_docs(cls: type, prefix: str = "") -> dict[str, tuple[str, Any]]:
    """``{dotted key: (doc, default)}`` for every leaf field of a (nested) config dataclass."""
    instance = cls()
    docs: dict[str, str] = {}
    for base in reversed(
        [c for c in cls.__mro__ if dataclasses.is_dataclass(c)]
    ):  # a subclass may redocument
        docs |= {name: doc for name, doc in _attribute_docs(base).items() if doc}
    out: dict[str, tuple[str, Any]] = {}
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(cls, f.name)
        if sub:
            out.update(field_docs(sub, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = (docs.get(f.name, ""), getattr(instance, f.name))
    return out
