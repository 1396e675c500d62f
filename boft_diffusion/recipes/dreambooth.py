"""DreamBooth with BOFT: teach a Stable Diffusion model a subject from a handful of photos.

    boft-diffusion train dreambooth --config configs/dreambooth/tiny.yaml [section.key=value ...]

The recipe is ``setup -> train -> save``. Per step, with the subject's latents ``x0`` and prompt
embedding ``c``: ``loss = || f(x_t, t, c) - target ||^2`` (target: noise or velocity, optionally
Min-SNR weighted); with prior preservation each batch also holds as many class images, whose
loss is added times ``prior_loss_weight``. Only the BOFT rotations (and scales, biases) train.
Everything generic lives in :mod:`boft_diffusion.training`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from torch import nn
from torch.utils.data import DataLoader

from ..data import (
    IMAGE_EXTENSIONS,
    DataError,
    DreamBoothDataset,
    EpochSampler,
    collate_dreambooth,
    generate_class_images,
    list_images,
)
from ..inject import adapter_state_dict, add_boft, count_parameters
from ..io import ADAPTER_WEIGHTS_NAME, save_boft_weights
from ..tiny import TINY_INSTANCE_PROMPT, TINY_RESOLUTION, make_instance_images
from ..training.args import (
    BOFTArgs,
    ConfigError,
    ModelArgs,
    OptimArgs,
    TrainArgs,
    ValidationArgs,
    config_to_dict,
    config_to_yaml,
)
from ..training.card import write_model_card
from ..training.checkpoint import (
    TrainingState,
    TrainProgress,
    check_finite_adapter,
    check_resume,
    interruption,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume_checkpoint,
    resume_keys,
    save_checkpoint,
)
from ..training.loop import (
    LossMeter,
    StepPlan,
    check_finite_loss,
    check_finite_parameters,
    epoch_batches,
    is_due,
)
from ..training.noise import (
    diffusion_loss,
    encode_latents,
    prediction_target,
    sample_noise,
    sample_timesteps,
    snr_loss_weights,
)
from ..training.optim import make_lr_scheduler, make_optimizer, trainable_parameters
from ..training.setup import (
    RUN_CONFIG_NAME,
    cast_frozen_weights,
    check_device,
    check_environment,
    check_model_source,
    check_output_dir,
    check_resolution,
    claim_output_dir,
    enable_memory_savers,
    folder_write_problem,
    forget_outputs,
    load_pipeline,
    make_accelerator,
    record_outputs,
    weight_dtype,
    write_run_config,
)
from ..training.tracking import ProgressBar, init_trackers
from ..training.validation import run_validation

__all__ = ["CONFIG_CLASS", "DreamBoothConfig", "DreamBoothDataArgs", "TrainResult", "run"]


@dataclass
class DreamBoothDataArgs:
    """Subject (instance) images and prompt, prior-preservation class images, preprocessing."""

    instance_data_dir: str | None = None
    """Folder of subject photos (an optional <image name>.txt beside a photo is its prompt); null: toy images generated into <output_dir>/instance_images."""
    instance_prompt: str = TINY_INSTANCE_PROMPT
    """Prompt with the rare identifier of the subject, e.g. 'a photo of sks dog'."""
    caption_extension: str = ".txt"
    """Extension of the per-image caption files."""
    num_generated_images: int = 5
    """How many toy images to generate when instance_data_dir is null."""
    with_prior_preservation: bool = False
    """Also train on class images (prompt: class_prompt) to keep the class's prior."""
    class_data_dir: str | None = None
    """Folder of class images; missing ones are generated with the base model and reused next time (null: <output_dir>/class_images)."""
    class_prompt: str | None = None
    """Prompt of the class, e.g. 'a photo of dog' (required with prior preservation)."""
    num_class_images: int = 100
    """Class images to use (generated if the folder holds fewer)."""
    prior_loss_weight: float = 1.0
    """Weight of the class-image loss."""
    sample_batch_size: int = 4
    """Batch size when generating class images."""
    class_inference_steps: int = 25
    """Sampler steps when generating class images."""
    resolution: int = TINY_RESOLUTION
    """Training image size in pixels (square; a multiple of 8)."""
    center_crop: bool = False
    """Center-crop to the resolution (false: random crop)."""
    random_flip: bool = False
    """Flip images horizontally at random."""

    def __post_init__(self) -> None:
        if self.with_prior_preservation and not self.class_prompt:
            raise ConfigError(
                "data.with_prior_preservation needs data.class_prompt (e.g. 'a photo of a dog')"
            )
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"data.resolution must be a positive multiple of 8 (got {self.resolution})")
        if self.num_class_images < 1 or self.num_generated_images < 1 or self.sample_batch_size < 1:
            raise ConfigError(
                "data.num_class_images, num_generated_images and sample_batch_size must be >= 1"
            )
        if self.class_inference_steps < 1:
            raise ConfigError(f"data.class_inference_steps must be >= 1 (got {self.class_inference_steps})")
        weight = self.prior_loss_weight
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"data.prior_loss_weight must be a finite number >= 0 (got {weight})")


@dataclass
class DreamBoothConfig:
    """A DreamBooth run; the defaults are the embedded tiny job (configs/dreambooth/tiny.yaml)."""

    model: ModelArgs = field(default_factory=ModelArgs)
    boft: BOFTArgs = field(default_factory=BOFTArgs)
    data: DreamBoothDataArgs = field(default_factory=DreamBoothDataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    validation: ValidationArgs = field(default_factory=ValidationArgs)


CONFIG_CLASS = DreamBoothConfig
"""The recipe's config class (``boft-diffusion train dreambooth`` loads it)."""

RUN_IDENTITY = ("model", "boft", "data", "train.seed")
"""Keys that make two configs the same run (a resume may change the others, e.g. steps or logging)."""


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    losses: list[float]
    """Loss of every optimiser step of this invocation (mean over micro-batches and processes)."""
    adapter: dict[str, torch.Tensor]
    """Final trained tensors, ``<component>.<module path>.boft_R`` etc., on the CPU (every process)."""
    trainable_parameters: int


@dataclass
class Parts:
    """What the training loop works with (``unet``/``text_encoder``: as prepared by accelerate)."""

    pipe: Any
    unet: nn.Module
    text_encoder: nn.Module
    components: dict[str, nn.Module]
    noise_scheduler: DDPMScheduler
    dataloader: DataLoader
    epoch_aware: list[Any]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    params: list[nn.Parameter]
    plan: StepPlan
    progress: TrainProgress
    state: TrainingState
    """What a checkpoint saves and restores (the adapter, optimiser, schedule and ``progress``)."""


# --- setup ----------------------------------------------------------------------------------------
def _planned_outputs(cfg: DreamBoothConfig) -> list[str]:
    """What a run writes into output_dir (relative paths), besides checkpoints and class images."""
    t = cfg.train
    paths = [RUN_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, "README.md"]
    paths += ["instance_images"] if cfg.data.instance_data_dir is None else []
    paths += [t.logging_dir] if t.report_to != "none" else []
    paths += ["validation"] if cfg.validation.prompts else []
    return paths + (["merged"] if t.export_merged else [])


def _class_folder(cfg: DreamBoothConfig) -> Path:
    data_dir = cfg.data.class_data_dir
    return Path(data_dir).expanduser() if data_dir else Path(cfg.train.output_dir) / "class_images"


def _check_class_folder(cfg: DreamBoothConfig) -> None:
    """Class images are there already, or their folder can be created and filled."""
    folder = _class_folder(cfg)
    if folder.is_dir():
        present = sum(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())
        if present >= cfg.data.num_class_images:
            return  # nothing to generate: a read-only folder is fine
    problem = folder_write_problem(folder)
    if problem:
        raise DataError(f"data.class_data_dir: the class image folder {folder} {problem}")


def check_inputs(cfg: DreamBoothConfig) -> tuple[list[Path] | None, Path | None]:
    """Reject bad input before anything is written: returns (instance images, checkpoint to resume)."""
    t = cfg.train
    check_environment(t, cfg.optim)
    check_model_source(cfg.model.pretrained_model_name_or_path)
    images = None
    if cfg.data.instance_data_dir is not None:
        images = list_images(cfg.data.instance_data_dir, "instance", cfg.data.caption_extension)
    if cfg.data.with_prior_preservation:
        _check_class_folder(cfg)
    resume = resolve_resume_checkpoint(t.resume_from_checkpoint, t.output_dir)
    if resume is not None:
        check_resume(resume, cfg)  # the checkpoint's files and the keys its state depends on
    writes = _planned_outputs(cfg) + (["checkpoint-*"] if t.checkpointing_steps else [])
    check_output_dir(t.output_dir, config_to_dict(cfg), RUN_IDENTITY, t.overwrite_output_dir, writes)
    if t.export_merged and not t.overwrite_output_dir and (Path(t.output_dir) / "merged").exists():
        raise ConfigError(
            f"train.export_merged: {Path(t.output_dir) / 'merged'} exists (an earlier export); remove it "
            "or pass train.overwrite_output_dir=true"
        )
    return images, resume


def _instance_images(
    cfg: DreamBoothConfig, accelerator: Accelerator, images: list[Path] | None
) -> list[Path]:
    if images is not None:
        return images
    folder = Path(cfg.train.output_dir) / "instance_images"
    if accelerator.is_main_process:
        record_outputs(cfg.train.output_dir, folder)  # first: a start killed while writing leaves it ours
        make_instance_images(folder, cfg.data.num_generated_images, cfg.model.tiny_seed, cfg.data.resolution)
    accelerator.wait_for_everyone()
    return list_images(folder, "instance", cfg.data.caption_extension)


def _class_images(cfg: DreamBoothConfig, accelerator: Accelerator, pipe: Any) -> list[Path] | None:
    """Class images, generated where missing; those generated inside output_dir are recorded as ours."""
    data, out = cfg.data, Path(cfg.train.output_dir)
    if not data.with_prior_preservation:
        return None
    folder = _class_folder(cfg)
    if accelerator.is_main_process:
        inside = folder.resolve().is_relative_to(out.resolve())
        before = set(folder.iterdir()) if folder.is_dir() else None
        if inside and before is None:
            record_outputs(out, folder)  # a folder this run creates
        generate_class_images(
            pipe, folder, data.class_prompt, data.num_class_images, data.sample_batch_size,
            data.class_inference_steps, data.resolution, cfg.train.seed, accelerator.is_local_main_process,
        )  # fmt: skip
        if inside and before is not None:
            record_outputs(out, *(set(folder.iterdir()) - before))  # images added to an existing folder
    accelerator.wait_for_everyone()
    return list_images(folder, "class")[: data.num_class_images]


def _add_adapters(cfg: DreamBoothConfig, pipe: Any) -> dict[str, nn.Module]:
    """BOFT on the (frozen) UNet and text encoder; only adapter tensors train. Returns the adapted models."""
    components = {
        "unet": add_boft(pipe.unet, cfg.boft.to_config(cfg.boft.unet_target_modules), cfg.boft.adapter_name)
    }
    if cfg.boft.train_text_encoder:
        te_config = cfg.boft.to_config(cfg.boft.text_encoder_target_modules)
        components["text_encoder"] = add_boft(pipe.text_encoder, te_config, cfg.boft.adapter_name)
    return components


def _dataloader(cfg: DreamBoothConfig, pipe: Any, instance: list[Path], classes: list[Path] | None):
    data = cfg.data
    dataset = DreamBoothDataset(
        instance, data.instance_prompt, data.resolution, data.center_crop, data.random_flip,
        classes, data.class_prompt, data.caption_extension, cfg.train.seed,
    )  # fmt: skip
    sampler = EpochSampler(len(dataset), cfg.train.seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.train_batch_size,
        sampler=sampler,
        collate_fn=partial(collate_dreambooth, tokenizer=pipe.tokenizer),
        num_workers=cfg.train.dataloader_num_workers,
        generator=torch.Generator().manual_seed(cfg.train.seed),  # keeps loader seeding off the global RNG
    )
    return loader, [sampler, dataset]


def setup(
    cfg: DreamBoothConfig, accelerator: Accelerator, pipe: Any, images: list[Path] | None, resume: Path | None
) -> Parts:
    """Data (generating what is missing), adapters, optimiser around the base ``pipe``; resumes if asked."""
    dtype = weight_dtype(accelerator)
    base = [pipe.unet, pipe.vae, pipe.text_encoder]
    for module in base:
        module.requires_grad_(False).eval()  # frozen parts never use dropout
    cast_frozen_weights(base, dtype, accelerator.device)
    instance = _instance_images(cfg, accelerator, images)
    classes = _class_images(cfg, accelerator, pipe)
    components = _add_adapters(cfg, pipe)
    cast_frozen_weights(components.values(), dtype, accelerator.device)  # trained tensors to float32
    enable_memory_savers(cfg.train, pipe.unet, components.get("text_encoder"))
    for module in components.values():
        module.train()
    loader, epoch_aware = _dataloader(cfg, pipe, instance, classes)
    params = trainable_parameters(components.values())
    t, n = cfg.train, accelerator.num_processes
    lr = cfg.optim.learning_rate * (
        t.train_batch_size * t.gradient_accumulation_steps * n if cfg.optim.scale_lr else 1
    )
    optimizer = make_optimizer(params, cfg.optim, lr)
    plan = StepPlan.create(
        math.ceil(len(loader) / n), t.gradient_accumulation_steps, t.max_train_steps, t.num_train_epochs
    )
    lr_scheduler = make_lr_scheduler(optimizer, cfg.optim, plan.max_train_steps, n)
    *models, optimizer, loader, lr_scheduler = accelerator.prepare(
        *components.values(), optimizer, loader, lr_scheduler
    )
    progress = TrainProgress()
    keys = resume_keys(cfg, plan.max_train_steps)
    state = TrainingState(components, optimizer, lr_scheduler, progress, cfg.boft.adapter_name, keys)
    if resume is not None:
        accelerator.print(f"Resuming from {resume}")
        load_checkpoint(accelerator, resume, state)
    return Parts(
        pipe=pipe,
        unet=models[0],
        text_encoder=models[1] if len(models) > 1 else pipe.text_encoder,
        components=components,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        dataloader=loader,
        epoch_aware=epoch_aware,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        params=params,
        plan=plan,
        progress=progress,
        state=state,
    )


# --- train ----------------------------------------------------------------------------------------
def compute_loss(cfg: DreamBoothConfig, parts: Parts, batch: dict[str, Any]) -> torch.Tensor:
    """Denoising loss of one batch (instance half + ``prior_loss_weight`` x class half)."""
    scheduler = parts.noise_scheduler
    with torch.no_grad():
        latents = encode_latents(parts.pipe.vae, batch["pixel_values"])
    noise = sample_noise(latents, cfg.train.noise_offset)
    timesteps = sample_timesteps(scheduler, latents.shape[0], latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with torch.set_grad_enabled(cfg.boft.train_text_encoder):
        hidden = parts.text_encoder(batch["input_ids"].to(latents.device), return_dict=False)[0]
    pred = parts.unet(noisy, timesteps, hidden, return_dict=False)[0]
    target = prediction_target(scheduler, latents, noise, timesteps)
    weights = snr_loss_weights(scheduler, timesteps, cfg.train.snr_gamma) if cfg.train.snr_gamma else None
    if not cfg.data.with_prior_preservation:
        return diffusion_loss(pred, target, weights)
    n = pred.shape[0] // 2
    w_inst, w_class = (None, None) if weights is None else (weights[:n], weights[n:])
    prior = diffusion_loss(pred[n:], target[n:], w_class)
    return diffusion_loss(pred[:n], target[:n], w_inst) + cfg.data.prior_loss_weight * prior


def validate(
    cfg: DreamBoothConfig, accelerator: Accelerator, parts: Parts, name: str, tag: str = "validation"
):
    out = Path(cfg.train.output_dir) / "validation" / f"{name}.png"
    return run_validation(
        accelerator, parts.pipe, cfg.validation, cfg.data.resolution, out, parts.progress.step,
        trained=list(parts.components.values()), tag=tag,
    )  # fmt: skip


def _save_checkpoint(cfg: DreamBoothConfig, accelerator: Accelerator, parts: Parts) -> None:
    """A checkpoint of this step, recorded as this run's; older ones pruned only once it is saved."""
    out = cfg.train.output_dir
    saved = save_checkpoint(accelerator, parts.state, out, parts.progress.step)
    if accelerator.is_main_process:
        record_outputs(out, saved)
        forget_outputs(out, *prune_checkpoints(out, saved, cfg.train.checkpoints_total_limit))
    accelerator.wait_for_everyone()


def train(
    cfg: DreamBoothConfig,
    accelerator: Accelerator,
    parts: Parts,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> list[float]:
    """The loop: accumulate, clip, step; log, checkpoint and validate on schedule. Returns the losses.

    A NaN or inf loss (checked before ``backward``) or trained parameter (after the step) stops the
    run with ``TrainingDiverged`` before anything of that step is saved. Ctrl-C abandons the step
    in progress and raises ``TrainingInterrupted`` naming the last checkpoint.
    """
    plan, progress, t = parts.plan, parts.progress, cfg.train
    bar = ProgressBar(accelerator, plan.max_train_steps, progress.step)
    meter, losses = LossMeter(), []
    first_epoch, skip = plan.position(progress.step)
    trained = [parts.unet, parts.text_encoder] if cfg.boft.train_text_encoder else [parts.unet]
    try:
        for epoch in range(first_epoch, plan.num_epochs):
            skip_now = skip if epoch == first_epoch else 0
            for batch in epoch_batches(accelerator, parts.dataloader, epoch, skip_now, parts.epoch_aware):
                if progress.step >= plan.max_train_steps:
                    break
                with accelerator.accumulate(*trained):
                    loss = compute_loss(cfg, parts, batch)
                    check_finite_loss(accelerator, loss, progress.step + 1)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.optim.max_grad_norm:
                        accelerator.clip_grad_norm_(parts.params, cfg.optim.max_grad_norm)
                    parts.optimizer.step()
                    parts.lr_scheduler.step()
                    parts.optimizer.zero_grad(set_to_none=True)
                meter.add(loss)
                if not accelerator.sync_gradients:
                    continue
                progress.step += 1
                check_finite_parameters(parts.components, progress.step)
                logs = {"loss": meter.pop(accelerator), "lr": parts.lr_scheduler.get_last_lr()[0]}
                losses.append(logs["loss"])
                bar.update(logs)
                accelerator.log(logs, step=progress.step)
                if is_due(progress.step, t.checkpointing_steps):
                    _save_checkpoint(cfg, accelerator, parts)
                if is_due(progress.step, cfg.validation.validation_steps):
                    validate(cfg, accelerator, parts, f"step-{progress.step:06d}")
                if on_step is not None:
                    on_step(progress.step, logs)
    except KeyboardInterrupt as err:
        raise interruption(t.output_dir, progress.step) from err
    finally:
        bar.close()
    return losses


# --- save -----------------------------------------------------------------------------------------
def _usage(cfg: DreamBoothConfig) -> str:
    base = cfg.model.pretrained_model_name_or_path
    if base:
        imports, load = (
            "from diffusers import StableDiffusionPipeline",
            f'StableDiffusionPipeline.from_pretrained("{base}")',
        )
    else:
        imports, load = (
            "from boft_diffusion.tiny import build_tiny_pipeline",
            f"build_tiny_pipeline(seed={cfg.model.tiny_seed})",
        )
    return f"""
{imports}
from boft_diffusion.io import load_boft_weights
from boft_diffusion.pipeline import merge_boft

pipe = {load}
load_boft_weights(pipe, "{cfg.train.output_dir}")
merge_boft(pipe)  # optional: fold the rotations into the weights for base-model speed
image = pipe("{cfg.data.instance_prompt}").images[0]
"""


def save_outputs(cfg: DreamBoothConfig, accelerator: Accelerator, parts: Parts, trainable: int) -> None:
    """Adapter, final sample grid, model card and (if asked) the merged export; main process writes."""
    out = Path(cfg.train.output_dir)
    base = cfg.model.pretrained_model_name_or_path or f"boft_diffusion.tiny (seed {cfg.model.tiny_seed})"
    check_finite_adapter(parts.components, cfg.boft.adapter_name, f"the final adapter in {out}")
    if accelerator.is_main_process:
        save_boft_weights(parts.components, out, cfg.boft.adapter_name, metadata={"base_model": base})
    grid = validate(cfg, accelerator, parts, "final", tag="final")
    if not accelerator.is_main_process:
        return
    hyper = {f"boft.{k}": v for k, v in config_to_dict(cfg.boft).items()}
    hyper |= {
        f"optim.{k}": getattr(cfg.optim, k) for k in ("learning_rate", "lr_scheduler", "lr_warmup_steps")
    }
    for key in (
        "max_train_steps",
        "train_batch_size",
        "gradient_accumulation_steps",
        "mixed_precision",
        "seed",
    ):
        hyper[f"train.{key}"] = getattr(cfg.train, key)
    for key in (
        "resolution",
        "with_prior_preservation",
        "class_prompt",
        "num_class_images",
        "prior_loss_weight",
    ):
        hyper[f"data.{key}"] = getattr(cfg.data, key)
    write_model_card(
        out,
        title=f"BOFT DreamBooth adapter: {cfg.data.instance_prompt}",
        base_model=base,
        description=f"A BOFT adapter for `{base}` trained with DreamBooth on the prompt "
        f"`{cfg.data.instance_prompt}` for {parts.progress.step} steps with boft-diffusion.",
        hyperparameters=hyper,
        trainable_parameters=trainable,
        usage=_usage(cfg),
        images=[str(grid.relative_to(out))] if grid else [],
        tags=("boft", "dreambooth", "diffusers", "text-to-image", "stable-diffusion"),
        instance_prompt=cfg.data.instance_prompt,
    )
    if cfg.train.export_merged:
        from ..export import export_merged

        export_merged(parts.pipe, out / "merged")


def run(cfg: DreamBoothConfig, on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train a DreamBooth BOFT adapter as ``cfg`` says; ``on_step(step, logs)`` runs after each step.

    Every check (config, data, model, resume, device, folders, sizes) runs before anything is
    written; everything written into output_dir is recorded in its manifest.
    """
    images, resume = check_inputs(cfg)
    accelerator = make_accelerator(cfg.train)
    check_device(accelerator, cfg.train)
    pipe = load_pipeline(cfg.model)  # the last checks: a hub id may not load, a size may not suit the model
    check_resolution(pipe, cfg.data.resolution, "data.resolution")
    check_resolution(pipe, cfg.validation.resolution, "validation.resolution")
    set_seed(cfg.train.seed, device_specific=True)
    out, main = Path(cfg.train.output_dir), accelerator.is_main_process
    inputs = [p for p in (cfg.data.instance_data_dir, cfg.data.class_data_dir, resume) if p is not None]
    with claim_output_dir(accelerator, cfg.train, keep=inputs):  # a failed start puts overwritten runs back
        parts = setup(cfg, accelerator, pipe, images, resume)
        if main:  # only now: a start that failed leaves no config that would refuse the corrected rerun
            write_run_config(out, config_to_yaml(cfg))
    if main:
        record_outputs(out, *_planned_outputs(cfg))
    init_trackers(accelerator, cfg.train.tracker_project_name, config_to_dict(cfg))
    trainable = sum(count_parameters(m)[0] for m in parts.components.values())
    accelerator.print(f"Training {trainable:,d} BOFT parameters for {parts.plan.max_train_steps} steps")
    start = time.perf_counter()
    losses = train(cfg, accelerator, parts, on_step)
    accelerator.wait_for_everyone()
    save_outputs(cfg, accelerator, parts, trainable)
    if main:
        record_outputs(out, *(path for _, path in list_checkpoints(out)))
    accelerator.print(f"Done in {time.perf_counter() - start:.1f}s; adapter in {cfg.train.output_dir}")
    accelerator.end_training()
    adapter = {
        f"{comp}.{key}": value.detach().cpu().clone()
        for comp, module in parts.components.items()
        for key, value in adapter_state_dict(module, cfg.boft.adapter_name).items()
    }
    return TrainResult(Path(cfg.train.output_dir), parts.progress.step, losses, adapter, trainable)
