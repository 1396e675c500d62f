"""Controllable generation with BOFT: make a Stable Diffusion model follow a control image.

    boft-diffusion train controlnet --config configs/controlnet/tiny_controlnet.yaml [section.key=value ...]

Two modes, one loss. Per step, with the image's latents ``x0``, its control image ``c`` (in [0, 1])
and its caption's embedding ``e``: ``loss = || f(x_t, t, e; c) - target ||^2`` (noise or velocity,
optionally Min-SNR weighted), where the control enters ``f`` as

- ``light``: a small encoder ``E`` (diffusers' ``ControlNetConditioningEmbedding``, trained in full,
  zero-initialised output) adds ``E(c)`` to the UNet's first feature map through a removable hook
  (:mod:`boft_diffusion.control`), and BOFT rotates the UNet attention: the BOFT / OFT papers'
  controllable-generation setup and PEFT's ``boft_controlnet`` example;
- ``controlnet``: a stock ``ControlNetModel`` (from a folder, or initialised from the UNet) whose
  residuals join the UNet's skip connections; BOFT on its attention (optionally the UNet's), its
  condition embedding and zero convolutions trained in full (a fresh ControlNet outputs zeros).

Only those tensors train; the base stays frozen. The run measures control fidelity before and after
(the control signal detected again on samples and scored against the condition: edge F1 and mask
IoU through the world scorer on the embedded default). The life cycle is
:class:`~boft_diffusion.training.recipe.TrainingRecipe`'s.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..config import BOFTConfig
from ..control import (
    CONTROL_COMPONENT,
    CONTROL_METADATA,
    LightControl,
    add_light_control,
    controlnet_fingerprints,
    controlnet_from_unet,
    sample_with_control,
    save_light_control,
)
from ..data import (
    ControlDataset,
    DataError,
    collate_control,
    load_control_examples,
    load_rgb,
    write_world_control_data,
)
from ..inject import apply_adapter_plan, plan_adapter
from ..metrics import (
    ControlProbe,
    Measurement,
    MetricsError,
    before_after_control_rows,
    cases_from_conditions,
    grid,
    load_control_detector,
    measure_control,
    world_control_cases,
)
from ..training.args import (
    ConfigError,
)
from ..training.card import CardParts
from ..training.noise import (
    diffusion_loss,
    noise_latents,
)
from ..training.recipe import TrainingRecipe, TrainResult
from .controlnet_config import (
    ControlNetConfig,
)

__all__ = ["CONFIG_CLASS", "ControlNetConfig", "ControlNetRecipe", "TrainResult", "run"]


def controlnet_saved_modules(controlnet: nn.Module) -> list[str]:
    """The ControlNet parts that train in full: its condition embedding and its zero convolutions (each
    named: the ControlNet iterates its ``controlnet_down_blocks`` list, which must stay a list)."""
    downs = [f"controlnet_down_blocks.{i}" for i in range(len(controlnet.controlnet_down_blocks))]
    return ["controlnet_cond_embedding", *downs, "controlnet_mid_block"]


CONFIG_CLASS = ControlNetConfig
"""The recipe's config class (``boft-diffusion train controlnet`` loads it)."""


CARD_HYPERPARAMETERS = (
    "control.mode", "control.encoder_block_out_channels", "control.controlnet_model_name_or_path",
    "control.train_unet", "optim.learning_rate", "optim.lr_scheduler", "train.max_train_steps",
    "train.train_batch_size", "train.gradient_accumulation_steps", "train.mixed_precision", "train.seed",
    "data.resolution", "data.proportion_empty_prompts",
)  # fmt: skip


class ControlNetRecipe(TrainingRecipe):
    """Control image -> light encoder or ControlNet, BOFT on attention, the denoising loss."""

    cfg: ControlNetConfig
    run_identity = ("model", "boft", "control", "data", "train.seed")
    recipe_name = "ControlNet"
    unshardable = (
        "its validation, measurement and merged export read the ControlNet (or the light encoder) whole; "
        "its trained parameters fit plain data parallelism (accelerate launch --multi_gpu)"
    )

    def __init__(self, cfg: ControlNetConfig) -> None:
        super().__init__(cfg)
        self.detector: Any = None
        self.probe: ControlProbe | None = None
        self.examples: list[Any] | None = None
        self.controlnet: nn.Module | None = None
        """controlnet mode: the ControlNet (loaded or built in ``check_pipeline``)."""
        self.controlnet_fingerprints: dict[str, str] = {}
        """controlnet mode: its fingerprints as loaded (``control.controlnet_fingerprints``), for the adapter."""

    @property
    def tiny(self) -> bool:
        return self.cfg.model.pretrained_model_name_or_path is None

    # --- check -----------------------------------------------------------------------------------
    def check_task_inputs(self) -> None:
        data, c = self.cfg.data, self.cfg.control
        if data.train_data_dir or data.dataset_name:
            self.examples = load_control_examples(
                data.train_data_dir, data.dataset_name, data.columns, dataset_config_name=data.dataset_config_name,
                cache_dir=data.cache_dir, max_examples=data.max_train_samples,
            )  # fmt: skip
        elif not self.tiny:
            raise ConfigError(
                "data: give data.train_data_dir or data.dataset_name (the world's scenes suit only the tiny model)"
            )
        if c.mode == "controlnet" and c.controlnet_model_name_or_path:
            _check_controlnet_source(c.controlnet_model_name_or_path)
        for key, paths in (
            ("validation.conditioning_images", self.cfg.validation.conditioning_images),
            ("metrics.conditioning_images", self.cfg.metrics.conditioning_images),
        ):
            for path in paths:
                try:
                    load_rgb(Path(path).expanduser())
                except (DataError, OSError) as err:
                    raise ConfigError(f"{key}: {err}") from None
        self._check_metrics()

    def _check_metrics(self) -> None:
        m = self.cfg.metrics
        spec = ("world" if self.tiny and not m.prompts else "edges") if m.detector == "auto" else m.detector
        try:
            self.detector = load_control_detector(spec)
            if self.detector is None:
                self.probe = None
                return
            if m.prompts:
                conditions = [load_rgb(Path(p).expanduser()) for p in m.conditioning_images]
                cases = cases_from_conditions(m.prompts, conditions, self.cfg.data.condition_kind)
            elif self.tiny:
                cases = world_control_cases(
                    m.num_cases, kind=self.cfg.data.condition_kind, resolution=self.cfg.data.resolution
                )
            else:
                raise ConfigError(
                    "metrics: control fidelity on your model needs metrics.prompts and metrics.conditioning_images "
                    "(or metrics.detector=none)"
                )
            self.probe = ControlProbe(tuple(cases), m.num_images, m.seed)
        except MetricsError as err:
            raise ConfigError(f"metrics: {err}") from None

    def planned_outputs(self) -> list[str]:
        generated = ["control_data"] if self.examples is None else []
        validation = ["validation"] if self._validation_cases_available() else []
        return [p for p in super().planned_outputs() if p != "validation"] + validation + generated

    def _validation_cases_available(self) -> bool:
        return bool(self.cfg.validation.prompts) or self.probe is not None

    def input_paths(self) -> list[str | Path]:
        controlnet = self.cfg.control.controlnet_model_name_or_path
        local = [controlnet] if controlnet and Path(controlnet).expanduser().exists() else []
        return [
            *super().input_paths(),
            *local,
            *(p for p in (self.cfg.data.train_data_dir,) if p is not None),
        ]

    def check_pipeline(self) -> None:
        family = self.family
        if family.denoiser != "unet":
            raise ConfigError(
                f"controllable generation trains UNet families (sd, sdxl); {family.title} has a transformer "
                "denoiser, not supported yet"
            )
        if self.cfg.control.mode == "controlnet":
            self.controlnet = self._load_controlnet()
            saved = controlnet_saved_modules(self.controlnet)  # the adapter brings its own copies of these
            self.controlnet_fingerprints = controlnet_fingerprints(self.controlnet, saved)
        self._plan_adapters()

    def _load_controlnet(self) -> nn.Module:
        from diffusers import ControlNetModel

        c, unet = self.cfg.control, self.pipe.unet
        if c.controlnet_model_name_or_path:
            source = c.controlnet_model_name_or_path
            local = Path(source).expanduser()
            try:
                controlnet = ControlNetModel.from_pretrained(str(local) if local.exists() else source)
            except Exception as err:
                raise ConfigError(
                    f"control.controlnet_model_name_or_path: could not load a ControlNet from {source!r}: {err}"
                ) from None
            _check_controlnet_fits(controlnet, unet)
            return controlnet
        # as loading rebuilds it
        return controlnet_from_unet(unet, c.widths(self.pipe.vae_scale_factor), c.seed)

    def _plan_adapters(self) -> dict[str, Any]:
        """The adapter of each trained component, checked against it (nothing is changed yet)."""
        boft, c = self.cfg.boft, self.cfg.control
        targets: dict[str, tuple[nn.Module, BOFTConfig, str]] = {}
        if c.mode == "light" or c.train_unet:
            targets["unet"] = (
                self.pipe.unet,
                boft.to_config(boft.unet_target_modules),
                "boft.unet_target_modules",
            )
        if c.mode == "controlnet":
            config = boft.to_config(boft.controlnet_target_modules)
            config.modules_to_save = controlnet_saved_modules(self.controlnet)
            targets["controlnet"] = (self.controlnet, config, "boft.controlnet_target_modules")
        return self.plan_adapters(targets)

    # --- build -----------------------------------------------------------------------------------
    def build(self) -> None:
        examples = self.examples if self.examples is not None else self._world_examples()
        self.components = self._add_adapters()
        data, t = self.cfg.data, self.cfg.train
        dataset = ControlDataset(
            examples,
            data.resolution,
            data.center_crop,
            data.random_flip,
            data.proportion_empty_prompts,
            t.seed,
        )
        tokenize = partial(self.family.tokenize, self.family.tokenizers(self.pipe))
        self.make_dataloader(dataset, partial(_collate, tokenize=tokenize))

    def _world_examples(self) -> list[Any]:
        cfg = self.cfg
        folder = Path(cfg.train.output_dir) / "control_data"
        data = cfg.data
        self.write_output_folder(
            folder,
            lambda: write_world_control_data(
                folder, data.num_generated_examples, cfg.train.seed, data.condition_kind, data.resolution
            ),
        )
        return load_control_examples(folder, columns=cfg.data.columns)

    def _add_adapters(self) -> dict[str, nn.Module]:
        c, boft = self.cfg.control, self.cfg.boft
        plans = self._plan_adapters()
        components = {"unet": apply_adapter_plan(self.pipe.unet, plans["unet"])} if "unet" in plans else {}
        if c.mode == "controlnet":
            self.pipe.controlnet = apply_adapter_plan(self.controlnet, plans["controlnet"])
            self.controlnet.to(self.accelerator.device)
            if self.cfg.train.gradient_checkpointing:  # the shared setup does the UNet's
                self.controlnet.enable_gradient_checkpointing()
            components["controlnet"] = self.controlnet
        else:
            control = add_light_control(
                self.pipe, block_out_channels=c.widths(self.pipe.vae_scale_factor), seed=c.seed
            )
            saved = BOFTConfig(target_modules=[], modules_to_save=["encoder"])
            components[CONTROL_COMPONENT] = apply_adapter_plan(
                control, plan_adapter(control, saved, boft.adapter_name)
            )
        return components

    # --- train -----------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        cfg, family = self.cfg, self.family
        with torch.no_grad():
            latents = self.family.encode_latents(self.pipe.vae, batch["pixel_values"])
            encoders = {name: getattr(self.pipe, name) for name in family.text_encoders}
            conditioning = family.encode_prompt(encoders, batch, latents.device)
        noised = noise_latents(family.objective, self.noise_scheduler, latents, cfg.train)
        noisy, timesteps = noised.noisy, noised.timesteps
        condition = batch["conditioning_pixel_values"].to(latents.device)
        unet = self.prepared("unet") if "unet" in self.components else self.pipe.unet
        if cfg.control.mode == "light":
            control: LightControl = self.pipe.control_encoder
            features = self.prepared(CONTROL_COMPONENT)(condition)
            with control.adding(features):
                pred = family.denoise(unet, noisy, timesteps, conditioning)
        else:
            down, mid = self.prepared("controlnet")(
                noisy, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"],
                controlnet_cond=condition, added_cond_kwargs=conditioning.get("added_cond_kwargs"), return_dict=False,
            )  # fmt: skip
            dtype = self.pipe.unet.dtype  # float32 residuals of trained parts meet a bf16 / fp16 UNet
            residuals = {
                "down_block_additional_residuals": [d.to(dtype) for d in down],
                "mid_block_additional_residual": mid.to(dtype),
            }
            pred = family.denoise(unet, noisy, timesteps, {**conditioning, **residuals})
        return diffusion_loss(pred, noised.target, noised.weights)

    # --- sample, measure, validate ---------------------------------------------------------------
    def sample(
        self, prompts: list[str], conditions: list[Image.Image], seeds: list[int]
    ) -> list[Image.Image]:
        m = self.cfg.metrics
        return sample_with_control(
            self.pipe, prompts, conditions, seeds, num_inference_steps=m.num_inference_steps,
            guidance_scale=m.guidance_scale, conditioning_scale=self.cfg.control.conditioning_scale,
            resolution=self.cfg.data.resolution,
        )  # fmt: skip

    def measures(self) -> bool:
        return self.probe is not None

    def measure(self) -> Measurement:
        return measure_control(self.sample, self.probe, self.detector)

    def measure_info(self) -> dict[str, Any]:
        return {
            "scorer": self.detector.name,
            "cases": [case.prompt for case in self.probe.cases],
            "num_images": self.probe.num_images,
            "seed": self.probe.seed,
        }

    def metrics_rows(self, before: Measurement | None, after: Measurement) -> list[list[Image.Image]]:
        return before_after_control_rows(before, after)  # the condition once, then before / after samples

    def _validation_grid(self) -> Image.Image:
        v = self.cfg.validation
        if v.prompts:
            prompts = list(v.prompts)
            conditions = [load_rgb(Path(p).expanduser()) for p in v.conditioning_images]
        else:
            cases = self.probe.cases[: v.num_cases]
            prompts, conditions = [c.prompt for c in cases], [c.condition for c in cases]
        rows = []
        for prompt, condition in zip(prompts, conditions):
            seeds = [v.seed + j for j in range(v.num_images_per_prompt)]
            images = sample_with_control(
                self.pipe, [prompt] * len(seeds), [condition] * len(seeds), seeds,
                num_inference_steps=v.num_inference_steps, guidance_scale=v.guidance_scale,
                conditioning_scale=self.cfg.control.conditioning_scale, resolution=v.resolution or self.cfg.data.resolution,
            )  # fmt: skip
            rows.append([condition.convert("RGB").resize(images[0].size), *images])
        return grid(rows)

    def validate(self, name: str, tag: str = "validation") -> Path | None:
        if not self._validation_cases_available():
            return None
        from ..training.validation import run_validation

        out = Path(self.cfg.train.output_dir) / "validation" / f"{name}.png"
        return run_validation(
            self.accelerator, self.pipe, self.cfg.validation, self.cfg.data.resolution, out, self.step,
            trained=list(self.components.values()), tag=tag, make_grid=self._validation_grid,
        )  # fmt: skip

    # --- save ------------------------------------------------------------------------------------
    def adapter_metadata(self) -> dict[str, str]:
        c = self.cfg.control
        info: dict[str, Any] = {"mode": c.mode}
        if c.mode == "controlnet":
            info["controlnet"] = c.controlnet_model_name_or_path or "from_unet"
            info["conditioning_embedding_out_channels"] = list(
                self.controlnet.config.conditioning_embedding_out_channels
            )
            info["seed"] = c.seed
            info["conditioning_scale"] = c.conditioning_scale
            info |= self.controlnet_fingerprints  # loading checks the ControlNet the user gives against them
        return {CONTROL_METADATA: json.dumps(info, sort_keys=True)}

    def card_parts(self) -> CardParts:
        base, mode = self.base_model, self.cfg.control.mode
        return CardParts(
            title=f"BOFT controllable generation ({mode}) for {base}",
            description=f"A BOFT adapter for `{base}` that follows a control image ({mode} mode), trained for "
            f"{self.step} steps with boft-diffusion.",
            hyperparameters=CARD_HYPERPARAMETERS,
            usage=_usage(self.cfg),
            tags=("boft", "controlnet", "diffusers", "text-to-image", "stable-diffusion"),
        )

    def save_outputs(self, grid_path: Path | None) -> None:
        cfg, out = self.cfg, Path(self.cfg.train.output_dir)
        if cfg.train.export_merged:
            self._export_merged(out / "merged")

    def _export_merged(self, folder: Path) -> None:
        """Merged, stock folders: ``merged/controlnet`` (controlnet mode: the ControlNet with BOFT folded in,
        for ``ControlNetModel.from_pretrained``) and ``merged/pipeline`` (when the UNet was adapted); light
        mode adds ``merged/control_encoder``, the trained encoder alone (``load_light_control``)."""
        from ..atomic import staged_dir
        from ..export import export_merged
        from ..inject import merge_adapters, remove_boft

        if self.cfg.control.mode == "controlnet":
            merged = copy.deepcopy(self.controlnet).float()
            merge_adapters(merged)
            remove_boft(merged, keep_merged=True)
            with staged_dir(folder / "controlnet") as tmp:
                merged.save_pretrained(tmp)
        if "unet" in self.components:
            export_merged(self.pipe, folder / "pipeline")
        if self.cfg.control.mode == "light":
            save_light_control(self.pipe.control_encoder, folder / "control_encoder")


def _collate(examples: list[Any], tokenize: Any) -> dict[str, Any]:
    """:func:`collate_control`, with the family's token ids of the captions (one entry per text encoder)."""
    batch = collate_control(examples)
    batch.update(tokenize(batch["prompts"]))
    return batch


def _check_controlnet_source(source: str) -> None:
    """A local ControlNet folder holds config.json; anything else that looks like a path is missing."""
    path = Path(source).expanduser()
    local = path.exists() or path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1
    if local and not (path / "config.json").is_file():
        raise ConfigError(
            f"control.controlnet_model_name_or_path={source!r} is not a ControlNet folder (no config.json)"
        )


def _check_controlnet_fits(controlnet: nn.Module, unet: nn.Module) -> None:
    """A ControlNet's residuals must match the UNet's skip connections and text width."""
    cc, uc = controlnet.config, unet.config
    problems = [
        f"{key} {getattr(cc, key)!r} vs the UNet's {getattr(uc, key)!r}"
        for key in (
            "block_out_channels",
            "cross_attention_dim",
            "in_channels",
            "layers_per_block",
            "down_block_types",
        )
        if key in cc and key in uc and _norm(getattr(cc, key)) != _norm(getattr(uc, key))
    ]
    if problems:
        raise ConfigError(
            "control.controlnet_model_name_or_path: the ControlNet does not fit the UNet: "
            + "; ".join(problems)
        )


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value


def _usage(cfg: ControlNetConfig) -> str:
    base = cfg.model.pretrained_model_name_or_path
    load = f'StableDiffusionPipeline.from_pretrained("{base}")' if base else "build_tiny_pipeline()"
    imports = (
        "from diffusers import StableDiffusionPipeline"
        if base
        else "from boft_diffusion.tiny import build_tiny_pipeline"
    )
    if _controlnet_argument(cfg):
        imports += "\nfrom diffusers import ControlNetModel"
    return f"""
{imports}
from PIL import Image
from boft_diffusion.control import sample_with_control
from boft_diffusion.io import load_boft_weights

pipe = {load}
load_boft_weights(pipe, "{cfg.train.output_dir}"{_controlnet_argument(cfg)})  # the adapter with its control
image = sample_with_control(pipe, ["a photo of a red star"], [Image.open("control.png")], [0])[0]
"""


def _controlnet_argument(cfg: ControlNetConfig) -> str:
    """The usage's ``controlnet=`` argument: the ControlNet a run started from is the user's to give."""
    source = cfg.control.controlnet_model_name_or_path
    if cfg.control.mode != "controlnet" or not source:
        return ""  # the adapter brings its light encoder, or its ControlNet is rebuilt from the UNet
    return f", controlnet=ControlNetModel.from_pretrained({source!r})"


def run(cfg: ControlNetConfig, on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train a controllable-generation BOFT adapter as ``cfg`` says."""
    return ControlNetRecipe(cfg).run(on_step)
