"""The life cycle every training recipe shares: ``check -> setup -> train -> save``.

A recipe (``recipes/dreambooth.py``; the controllable-generation one next) subclasses
:class:`TrainingRecipe` and supplies only what is its own:

- ``check_task_inputs()``: its data checks (nothing may be written yet),
- ``build()``: data, adapters and dataloader on the loaded pipeline,
- ``compute_loss(batch)``: the objective of one batch,
- ``save_outputs()``: what it leaves behind besides the adapter (model card, export).

Everything else lives here once: the accelerator, the checks made before anything is written, the
output folder and its manifest, the optimiser and schedule, the loop (accumulation, clipping,
finite checks, Ctrl-C), checkpoints and validation. The recipe object *is* the run's state; its
attributes are set by :meth:`setup` and used by :meth:`train` and :meth:`save`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import nn
from torch.utils.data import DataLoader

from ..atomic import atomic_file, atomic_write_text, replaced_input
from ..config import BOFTConfig
from ..data import EpochSampler
from ..families import Family, family_of
from ..inject import AdapterPlan, boft_layers, count_parameters, plan_adapter, set_enabled, set_rotation_cache
from ..io import ADAPTER_WEIGHTS_NAME, AdapterFile, write_adapter
from ..io.load import FAMILY_METADATA
from ..metrics import Measurement, before_after_rows, format_metrics, grid
from ..pipeline import base_fingerprint
from ..quantized import recompute_in_backward
from .args import ConfigError, RecipeConfig, config_to_dict, config_to_yaml
from .card import CardParts, write_model_card
from .checkpoint import (
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
from .ema import AdapterEMA
from .loop import LossMeter, StepPlan, check_finite_loss, check_finite_parameters, epoch_batches, is_due
from .noise import training_scheduler
from .optim import make_lr_scheduler, make_optimizer, trainable_parameters
from .setup import (
    RUN_CONFIG_NAME,
    cast_frozen_weights,
    check_device,
    check_environment,
    check_family_keys,
    check_model_source,
    check_output_dir,
    check_resolution,
    claim_output_dir,
    enable_memory_savers,
    forget_outputs,
    load_pipeline,
    make_accelerator,
    record_outputs,
    recorded_outputs,
    weight_dtype,
    write_run_config,
)
from .sharding import check_sharding, full_adapter, is_sharded, samples_on_every_process
from .tracking import ProgressBar, init_trackers
from .validation import run_validation, sampling_context

__all__ = ["METRICS_GRID_NAME", "METRICS_NAME", "OnStep", "TrainResult", "TrainingRecipe"]

METRICS_NAME = "metrics.json"
METRICS_GRID_NAME = "metrics.png"
"""Samples of the metrics' prompts: a row per prompt, the base's images then the trained model's."""

OnStep = Callable[[int, dict[str, float]], None]
"""``on_step(step, logs)``: called after every optimiser step (tests stop runs with it)."""


@dataclass
class TrainResult:
    """What :meth:`TrainingRecipe.run_all` leaves a caller (every recipe's ``run`` returns one)."""

    output_dir: Path
    global_step: int
    losses: list[float]
    """Loss of every optimiser step of this invocation (mean over micro-batches and processes)."""
    adapter: dict[str, torch.Tensor]
    """Final trained tensors, ``<component>.<module path>.boft_R`` etc., on the CPU (every process)."""
    trainable_parameters: int


EMA_FOLDER = "ema"
"""Where the moving average (``train.ema_decay``) is saved, as an adapter folder of its own."""


class TrainingRecipe:
    """One training run. ``cfg`` is a :class:`~boft_diffusion.training.args.RecipeConfig` (a recipe's config extends it).

    Life cycle: :meth:`check_inputs` (also called by :meth:`setup`) rejects bad input before
    anything is written; :meth:`setup` loads the pipeline, claims the output folder and builds the
    run (resuming if asked); :meth:`train` runs the loop; :meth:`save` writes the final adapter and
    the recipe's outputs. :meth:`run_all` does all of it.
    """

    run_identity: tuple[str, ...] = ("model", "boft", "data", "train.seed")
    """Keys that make two configs the same run (a resume may change the others, e.g. steps or logging)."""
    recipe_name = "training"
    """The recipe's name in messages."""
    unshardable: str | None = None
    """Why the recipe cannot train under FSDP, if it cannot (:func:`~.sharding.check_sharding`)."""

    def __init__(self, cfg: RecipeConfig) -> None:
        self.cfg = cfg
        self.resume: Path | None = None
        # Set by setup():
        self.accelerator: Accelerator
        self.pipe: Any = None
        self.components: dict[str, nn.Module] = {}
        """The adapted models, unwrapped (``{"unet": ..., "text_encoder": ...}``)."""
        self.trained: list[nn.Module] = []
        """The adapted models as prepared by accelerate (what the loop calls and accumulates over)."""
        self.noise_scheduler: Any = None
        """DDPM, or flow-matching Euler for flow families (noise.training_scheduler)."""
        self.dataloader: Any = None
        self.epoch_aware: list[Any] = []
        self.optimizer: torch.optim.Optimizer
        self.lr_scheduler: Any = None
        self.params: list[nn.Parameter] = []
        self.plan: StepPlan
        self.state: TrainingState
        self.losses: list[float] = []
        self.base_fingerprint: str | None = None
        """The base pipeline's fingerprint (``pipeline.base_fingerprint``), stored in the adapter's metadata."""
        self.before: Measurement | None = None
        """The recipe's metrics of the base model, measured before the first step (main process)."""
        self.report: dict[str, Any] | None = None
        """metrics.json's content once the run has measured itself after training."""
        self._family: tuple[Any, Family] | None = None
        self.saved: AdapterFile | None = None
        """The final adapter as :meth:`save` wrote it (whole tensors, on the CPU)."""
        self.ema: AdapterEMA | None = None
        """The moving average of the trained tensors (``train.ema_decay``), made by :meth:`setup`."""

    # --- what a recipe supplies ------------------------------------------------------------------
    def check_task_inputs(self) -> None:
        """The recipe's own input checks (data folders, prompts); nothing may be written."""

    def planned_outputs(self) -> list[str]:
        """What the run writes into output_dir (relative paths), besides checkpoints."""
        t = self.cfg.train
        paths = [RUN_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, "README.md"]
        paths += [t.logging_dir] if t.report_to != "none" else []
        paths += ["validation"] if self.cfg.validation.prompts else []
        paths += [METRICS_NAME, METRICS_GRID_NAME] if self.measures() else []
        paths += [EMA_FOLDER] if t.ema_decay else []
        return paths + (["merged"] if t.export_merged else [])

    def input_paths(self) -> list[str | Path]:
        """What the run reads from disk (a local base model folder; recipes add their data folders).

        An overwrite of output_dir keeps them, and no planned output may replace them
        (:meth:`check_inputs`). Recipes extend this list with ``super().input_paths()``.
        """
        model = self.cfg.model.pretrained_model_name_or_path
        return [model] if model is not None and Path(model).expanduser().exists() else []

    def build(self) -> None:
        """Data, adapters (``self.components``) and ``self.dataloader`` / ``self.epoch_aware``."""
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def make_dataloader(
        self, dataset: Any, collate_fn: Callable[[list[Any]], Any], batch_sampler: Any = None
    ) -> None:
        """``self.dataloader`` over ``dataset`` as every recipe trains: an :class:`EpochSampler` seeded with
        ``train.seed`` (a resumed run continues mid-epoch exactly), ``train.train_batch_size`` and
        ``dataloader_num_workers``, loader seeding off the global RNG; or ``batch_sampler``'s batches (aspect-ratio
        buckets). Sampler and dataset are told each epoch (``self.epoch_aware``)."""
        t = self.cfg.train
        generator = torch.Generator().manual_seed(t.seed)  # keeps loader seeding off the global RNG
        workers = t.dataloader_num_workers
        if batch_sampler is not None:
            self.dataloader = DataLoader(
                dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=workers,
                generator=generator,
            )  # fmt: skip
            self.epoch_aware = [batch_sampler, dataset]
            return
        sampler = EpochSampler(len(dataset), t.seed)
        self.dataloader = DataLoader(
            dataset, batch_size=t.train_batch_size, sampler=sampler, collate_fn=collate_fn,
            num_workers=workers, generator=generator,
        )  # fmt: skip
        self.epoch_aware = [sampler, dataset]

    def card_parts(self) -> CardParts:
        """What the model card says about this recipe's run (title, description, keys, usage, tags)."""
        raise NotImplementedError

    def write_card(self, grid: Path | None) -> Path:
        """``<output_dir>/README.md`` from :meth:`card_parts`, the base, the parameter count, ``grid`` and the
        metrics."""
        parts, out = self.card_parts(), Path(self.cfg.train.output_dir)
        return write_model_card(
            out,
            title=parts.title,
            base_model=self.base_model,
            description=parts.description,
            hyperparameters=self.card_hyperparameters(parts.hyperparameters),
            trainable_parameters=self.trainable_count(),
            usage=parts.usage,
            images=[str(grid.relative_to(out))] if grid else [],
            metrics=self.report,
            tags=parts.tags,
            instance_prompt=parts.instance_prompt,
        )

    def save_outputs(self, grid: Path | None) -> None:
        """Exports (``grid``: the final sample grid): main process, after the adapter and the model card."""

    def adapter_metadata(self) -> dict[str, str]:
        """Extra metadata the adapter file carries (e.g. how to rebuild a trained control module)."""
        return {}

    def measures(self) -> bool:
        """Whether :meth:`measure` measures anything in this run (then metrics.json is written)."""
        return False

    def measure(self) -> Measurement:
        """What the model does now by the recipe's metrics (main process; adapters off means the base)."""
        raise NotImplementedError

    # --- check -----------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.state.progress.step

    def check_inputs(self) -> None:
        """Reject bad input before anything is written (config, packages, data, resume, output folder)."""
        cfg, t = self.cfg, self.cfg.train
        check_environment(t, cfg.optim)
        check_model_source(cfg.model.pretrained_model_name_or_path)
        self.check_task_inputs()
        merged = Path(t.output_dir) / "merged"
        if t.export_merged and not t.overwrite_output_dir and merged.exists():
            raise ConfigError(
                f"train.export_merged: {merged} exists (an earlier export); remove it or pass "
                "train.overwrite_output_dir=true"
            )
        self.resume = resolve_resume_checkpoint(t.resume_from_checkpoint, t.output_dir)
        if self.resume is not None:
            check_resume(self.resume, cfg)  # the checkpoint's files and the keys its state depends on
        writes = self.planned_outputs() + (["checkpoint-*"] if t.checkpointing_steps else [])
        self._check_outputs_apart()
        check_output_dir(t.output_dir, config_to_dict(cfg), self.run_identity, t.overwrite_output_dir, writes)

    def _check_outputs_apart(self) -> None:
        """No output of the run (output_dir's planned entries) replaces one of its inputs, whatever
        ``train.overwrite_output_dir`` says: e.g. a base loaded from an earlier run's ``merged`` export."""
        out = Path(self.cfg.train.output_dir).expanduser()
        inputs = [*self.input_paths(), *([self.resume] if self.resume else [])]
        # an earlier run's output inside an input folder is the run's own
        earlier = set(recorded_outputs(out))
        for rel in self.planned_outputs():
            replaced = replaced_input(out / rel, inputs, inside=out / rel not in earlier)
            if replaced is not None:
                raise ConfigError(
                    f"train.output_dir: this run writes {out / rel}, which would replace its input {replaced}; "
                    "choose another train.output_dir or move the input away"
                )

    def plan_adapters(self, targets: dict[str, tuple[nn.Module, BOFTConfig, str]]) -> dict[str, AdapterPlan]:
        """``{component: plan}``: each component's BOFT adapter (``boft.adapter_name``) checked against it,
        nothing changed yet. ``targets`` maps a component to ``(module, config, key)``, ``key`` the config
        key that chose its target modules: a layout that does not fit a targeted layer is bad input, one
        ConfigError naming that key and the component."""
        plans = {}
        for name, (module, config, key) in targets.items():
            try:
                plans[name] = plan_adapter(module, config, self.cfg.boft.adapter_name)
            except ValueError as err:
                raise ConfigError(
                    f"{key} on the {name}: {err}. Choose boft.block_num / boft.block_size to fit every "
                    "targeted layer's input width, or target fewer modules"
                ) from None
        return plans

    def on_main_process(self, write: Callable[[], Any]) -> None:
        """``write()`` (it writes files) on the main process only; every process waits until it is done."""
        if self.accelerator.is_main_process:
            write()
        self.accelerator.wait_for_everyone()

    def write_output_folder(self, folder: Path, write: Callable[[], Any]) -> None:
        """``write()`` fills ``folder`` inside output_dir, on the main process, after the run's manifest
        records the folder as its own (a start killed while writing leaves it ours to replace); every
        process waits until it is done."""

        def recorded() -> None:
            record_outputs(self.cfg.train.output_dir, folder)
            write()

        self.on_main_process(recorded)

    def check_pipeline(self) -> None:
        """Checks that need the loaded pipeline (e.g. that the adapter fits it): before anything is written."""

    # --- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Checks, accelerator, pipeline; then, inside the claimed output folder, the run itself."""
        cfg = self.cfg
        self.check_inputs()
        self.accelerator = make_accelerator(cfg.train)
        check_device(self.accelerator, cfg.train)
        # The last checks: a hub id may not load, a size may not fit. A quantized base computes in the
        # weight dtype (the other components load in float32 and are cast below).
        quantized = cfg.model.quantization.backend != "none"
        if quantized and self.accelerator.distributed_type == DistributedType.FSDP:
            raise ConfigError(
                f"model.quantization.backend={cfg.model.quantization.backend} cannot be sharded by FSDP (its weights "
                "are packed by the quantization library); launch plain data parallelism instead, each process "
                "holding the quantized base"
            )
        self.pipe = load_pipeline(
            cfg.model, **({"torch_dtype": weight_dtype(self.accelerator)} if quantized else {})
        )
        check_family_keys(cfg, self.family)
        check_resolution(self.pipe, cfg.data.resolution, "data.resolution")
        check_resolution(self.pipe, cfg.validation.resolution, "validation.resolution")
        self.check_pipeline()
        set_seed(cfg.train.seed, device_specific=True)
        out, main = Path(cfg.train.output_dir), self.accelerator.is_main_process
        keep = [*self.input_paths(), *([self.resume] if self.resume else [])]
        with claim_output_dir(self.accelerator, cfg.train, keep=keep):  # a failed start puts runs back
            self._setup_run()
            if main:  # only now: a start that failed leaves no config that would refuse the rerun
                write_run_config(out, config_to_yaml(cfg))
        if main:
            record_outputs(out, *self.planned_outputs())
        init_trackers(self.accelerator, cfg.train.tracker_project_name, config_to_dict(cfg))

    def _setup_run(self) -> None:
        """Frozen base in the compute dtype, the recipe's build, optimiser and schedule; resume."""
        cfg, accelerator, t = self.cfg, self.accelerator, self.cfg.train
        dtype = weight_dtype(accelerator)
        family = self.family
        names = (family.denoiser, "vae", *family.text_encoders)
        base = [m for m in (getattr(self.pipe, n, None) for n in names) if m is not None]
        for module in base:
            module.requires_grad_(False).eval()  # frozen parts never use dropout
        self.base_fingerprint = base_fingerprint(self.pipe)  # as loaded (float32), as eval loads it
        cast_frozen_weights(base, dtype, accelerator.device)
        self.build()
        # The torchao layers outside BOFT's (which recompute their whole call) keep only their input for backward.
        for module in base:
            recompute_in_backward(module, skip=[layer.base_layer for layer in boft_layers(module).values()])
        cast_frozen_weights(self.components.values(), dtype, accelerator.device)  # trained: float32
        trained_encoders = [self.components[n] for n in family.text_encoders if n in self.components]
        enable_memory_savers(t, getattr(self.pipe, family.denoiser), *trained_encoders)
        for module in self.components.values():
            module.train()
        self.noise_scheduler = training_scheduler(family.objective, self.pipe.scheduler)
        check_sharding(accelerator, self.components, self.recipe_name, self.unshardable)
        self.params = trainable_parameters(self.components.values())
        n = accelerator.num_processes
        lr = cfg.optim.learning_rate * (
            t.train_batch_size * t.gradient_accumulation_steps * n if cfg.optim.scale_lr else 1
        )
        optimizer = make_optimizer(self.parameter_groups(self.params), cfg.optim, lr)
        self.plan = StepPlan.create(
            math.ceil(len(self.dataloader) / n),
            t.gradient_accumulation_steps,
            t.max_train_steps,
            t.num_train_epochs,
        )
        lr_scheduler = make_lr_scheduler(optimizer, cfg.optim, self.plan.max_train_steps, n)
        *self.trained, self.optimizer, self.dataloader, self.lr_scheduler = accelerator.prepare(
            *self.components.values(), optimizer, self.dataloader, lr_scheduler
        )
        # FSDP2 shards the modules in place with new (DTensor) parameters: clip what the optimiser steps
        self.params = trainable_parameters(self.components.values())
        if is_sharded(accelerator):  # its all-gathers keep version counters: sampling rebuilds rotations
            for component in self.components.values():
                set_rotation_cache(component, False)
        keys = resume_keys(cfg, self.plan.max_train_steps)
        if t.ema_decay and is_sharded(accelerator):
            raise ConfigError(
                "train.ema_decay: a moving average of FSDP-sharded tensors is not supported yet"
            )
        self.ema = AdapterEMA(self.params, t.ema_decay, t.ema_on_cpu) if t.ema_decay else None
        self.state = TrainingState(
            self.components, self.optimizer, self.lr_scheduler, TrainProgress(), cfg.boft.adapter_name, keys,
            self.ema,
        )  # fmt: skip
        if self.resume is not None:
            accelerator.print(f"Resuming from {self.resume}")
            load_checkpoint(accelerator, self.resume, self.state)

    @property
    def family(self) -> Family:
        """The model family of the loaded pipeline (what its components are and how they are called); looked
        up once per pipeline, not per training step."""
        if self._family is None or self._family[0] is not self.pipe:
            self._family = (self.pipe, family_of(self.pipe))
        return self._family[1]

    def prepared(self, name: str) -> nn.Module:
        """The adapted component ``name`` as accelerate prepared it (what the loop must call)."""
        return self.trained[list(self.components).index(name)]

    # --- train -----------------------------------------------------------------------------------
    def train(self, on_step: OnStep | None = None) -> list[float]:
        """The loop: accumulate, clip, step; log, checkpoint and validate on schedule. Returns the losses.

        A NaN or inf loss (checked before the optimiser step) or trained parameter (after it) stops the
        run with ``TrainingDiverged`` before anything of that step is saved. Ctrl-C abandons the step
        in progress and raises ``TrainingInterrupted`` naming the last checkpoint.
        """
        accelerator, plan, progress = self.accelerator, self.plan, self.state.progress
        t = self.cfg.train
        bar = ProgressBar(accelerator, plan.max_train_steps, progress.step)
        meter = LossMeter()
        first_epoch, skip = plan.position(progress.step)
        try:
            for epoch in range(first_epoch, plan.num_epochs):
                skip_now = skip if epoch == first_epoch else 0
                for batch in epoch_batches(accelerator, self.dataloader, epoch, skip_now, self.epoch_aware):
                    if progress.step >= plan.max_train_steps:
                        break
                    loss = self._micro_step(batch, meter)
                    if loss is None:  # accumulating: no optimiser step yet
                        continue
                    progress.step += 1
                    check_finite_parameters(self.components, progress.step, accelerator)
                    logs = {"loss": loss, "lr": self.lr_scheduler.get_last_lr()[0]}
                    self.losses.append(logs["loss"])
                    bar.update(logs)
                    accelerator.log(logs, step=progress.step)
                    if is_due(progress.step, t.checkpointing_steps):
                        self.save_checkpoint()
                    if is_due(progress.step, self.cfg.validation.validation_steps):
                        self.validate(f"step-{progress.step:06d}")
                    if on_step is not None:
                        on_step(progress.step, logs)
        except KeyboardInterrupt as err:
            raise interruption(t.output_dir, progress.step) from err
        finally:
            bar.close()
        return self.losses

    def _micro_step(self, batch: dict[str, Any], meter: LossMeter) -> float | None:
        """Forward and backward of one micro-batch; on the last one of a step, the optimiser step.

        Returns the step's loss (mean over micro-batches and processes: one device sync per step)
        once the step is taken, else ``None``. A non-finite step loss raises before the optimiser
        step, so the parameters never take a NaN update.
        """
        accelerator, loss_value = self.accelerator, None
        with accelerator.accumulate(*self.trained):
            loss = self.compute_loss(batch)
            meter.add(loss)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                loss_value = meter.pop(accelerator)
                check_finite_loss(loss_value, self.state.progress.step + 1)
                if self.cfg.optim.max_grad_norm:
                    accelerator.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
            self.optimizer.step()
            if self.ema is not None and accelerator.sync_gradients:
                self.ema.update()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss_value

    def parameter_groups(self, params: list[nn.Parameter]) -> list[Any]:
        """The optimiser's parameter groups over ``params`` (the trainable ones): one group by default; a recipe
        may set a group's options (pivotal tuning: no weight decay on the token embeddings, whose fixed rows
        then never move)."""
        return params

    def save_checkpoint(self) -> Path:
        """A checkpoint of this step, recorded as this run's; older ones pruned only once it is saved."""
        accelerator, out = self.accelerator, self.cfg.train.output_dir
        saved = save_checkpoint(accelerator, self.state, out, self.step)
        if accelerator.is_main_process:
            record_outputs(out, saved)
            forget_outputs(out, *prune_checkpoints(out, saved, self.cfg.train.checkpoints_total_limit))
        accelerator.wait_for_everyone()
        return saved

    def validate(self, name: str, tag: str = "validation") -> Path | None:
        """Sample the validation grid into ``validation/<name>.png`` (and the trackers)."""
        out = Path(self.cfg.train.output_dir) / "validation" / f"{name}.png"
        with self.averaged():
            return run_validation(
                self.accelerator, self.pipe, self.cfg.validation, self.cfg.data.resolution, out, self.step,
                trained=list(self.components.values()), tag=tag,
            )  # fmt: skip

    def averaged(self) -> contextlib.AbstractContextManager[None]:
        """The moving average (``train.ema_decay``) in the trained tensors inside the block, if there is one."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def measure_run(self, stage: str) -> dict[str, Any] | None:
        """Measure the base (``stage="before"``: adapters off) or the trained model (``"after"``).

        Main process only (every process when sharded, in lockstep; the main one writes), trained
        modules in eval mode, the RNG state forked (measuring never changes
        what training draws). After training, writes ``metrics.json`` (before, after, per prompt where measured, scorer, probe),
        the before / after sample grid ``metrics.png``, and logs the numbers to the trackers; returns
        metrics.json's content (``None`` for "before" and on other processes).
        """
        accelerator = self.accelerator
        if not self.measures():
            return None
        report = None
        if accelerator.is_main_process or samples_on_every_process(accelerator):
            modes = [m.training for m in self.components.values()]
            for module in self.components.values():
                module.eval()
                set_enabled(module, stage != "before")
            devices = [accelerator.device] if accelerator.device.type == "cuda" else []
            forked = torch.random.fork_rng(devices=devices)
            with forked, torch.no_grad(), sampling_context(accelerator), self.averaged():
                measured = self.measure()
            for module, mode in zip(self.components.values(), modes):
                set_enabled(module, True)
                module.train(mode)
            if stage == "before":
                self.before = measured
            elif accelerator.is_main_process:
                report = self._write_metrics(measured)
        accelerator.wait_for_everyone()
        return report

    def _write_metrics(self, after: Measurement) -> dict[str, Any]:
        out, before = Path(self.cfg.train.output_dir), self.before
        report = {
            "step": self.step,
            "base_model": self.base_model,
            **self.measure_info(),
            "before": before.metrics if before is not None else None,
            "after": after.metrics,
        }
        if after.per_prompt or (before is not None and before.per_prompt):  # each prompt's own values
            report["per_prompt"] = {
                "before": before.per_prompt if before else None,
                "after": after.per_prompt,
            }
        atomic_write_text(out / METRICS_NAME, json.dumps(report, indent=2) + "\n")
        with atomic_file(out / METRICS_GRID_NAME) as tmp:
            grid(self.metrics_rows(before, after)).save(tmp, format="PNG")
        logs = {f"metrics/{k}": v for k, v in after.metrics.items() if v is not None}
        if before is not None:
            logs |= {f"metrics/{k}_before": v for k, v in before.metrics.items() if v is not None}
        self.accelerator.log(logs, step=self.step)
        return report

    def metrics_rows(self, before: Measurement | None, after: Measurement) -> list[list[Any]]:
        """Rows of the before / after grid ``metrics.png`` (default: per prompt, images before then after)."""
        return before_after_rows(before, after)

    def measure_info(self) -> dict[str, Any]:
        """What metrics.json says about how it measured (scorer, prompts); the recipe's."""
        return {}

    # --- save ------------------------------------------------------------------------------------
    @property
    def base_model(self) -> str:
        return self.cfg.model.name

    def trainable_count(self) -> int:
        return sum(count_parameters(m)[0] for m in self.components.values())

    def save(self) -> Path | None:
        """The final adapter (refused if non-finite), the final grid, then the recipe's outputs."""
        cfg, accelerator, out = self.cfg, self.accelerator, Path(self.cfg.train.output_dir)
        accelerator.wait_for_everyone()
        adapter = full_adapter(self.components, cfg.boft.adapter_name)  # every process: gathers shards
        check_finite_adapter(adapter, f"the final adapter in {out}")
        self.saved = adapter
        if accelerator.is_main_process:
            adapter.metadata = {
                "base_model": self.base_model,
                "base_fingerprint": self.base_fingerprint or "",
                FAMILY_METADATA: self.family.name,
                **self.adapter_metadata(),
                **adapter.metadata,
            }
            write_adapter(adapter, out)
        if self.ema is not None:
            self._save_average(out / EMA_FOLDER, adapter.metadata if accelerator.is_main_process else {})
        grid = self.validate("final", tag="final")
        self.report = self.measure_run("after")
        if accelerator.is_main_process:
            self.write_card(grid)
            self.save_outputs(grid)
            record_outputs(out, *(path for _, path in list_checkpoints(out)))
        return grid

    def _save_average(self, folder: Path, metadata: dict[str, str]) -> None:
        """The moving average as an adapter of its own (``load_boft_weights(pipe, folder)`` loads it)."""
        with self.averaged():
            adapter = full_adapter(self.components, self.cfg.boft.adapter_name)
        check_finite_adapter(adapter, f"the averaged adapter in {folder}")
        if self.accelerator.is_main_process:
            adapter.metadata = {**metadata, **adapter.metadata, "ema_decay": str(self.cfg.train.ema_decay)}
            write_adapter(adapter, folder)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors, ``<component>.<module path>.boft_R`` etc., whole and on the CPU: as saved
        once :meth:`save` ran (sharded runs end their process group after it), else gathered now (every
        process must call this when sharded)."""
        adapter = self.saved or full_adapter(self.components, self.cfg.boft.adapter_name)
        return {
            f"{comp}.{key}": value
            for comp, tensors in adapter.tensors.items()
            for key, value in tensors.items()
        }

    def card_hyperparameters(self, keys: tuple[str, ...]) -> dict[str, Any]:
        """The model card's table: every ``boft.*`` key and ``keys`` (dotted), with this run's values."""
        flat = {f"{s}.{k}": v for s, values in config_to_dict(self.cfg).items() for k, v in values.items()}
        return {k: v for k, v in flat.items() if k.startswith("boft.")} | {k: flat[k] for k in keys}

    def run(self, on_step: OnStep | None = None) -> TrainResult:
        """:meth:`run_all`, and what it trained."""
        losses = self.run_all(on_step)
        return TrainResult(
            Path(self.cfg.train.output_dir), self.step, losses, self.adapter_tensors(), self.trainable_count()
        )

    def run_all(self, on_step: OnStep | None = None) -> list[float]:
        """``setup -> train -> save``; returns this invocation's losses."""
        self.setup()
        accelerator = self.accelerator
        accelerator.print(
            f"Training {self.trainable_count():,d} parameters for {self.plan.max_train_steps} steps"
        )
        start = time.perf_counter()
        self.measure_run("before")
        losses = self.train(on_step)
        self.save()
        if self.report is not None:
            r = self.report
            accelerator.print(
                format_metrics(r["before"], r["after"], r.get("scorer", "?"), r.get("per_prompt"))
            )
        accelerator.print(
            f"Done in {time.perf_counter() - start:.1f}s; adapter in {self.cfg.train.output_dir}"
        )
        accelerator.end_training()
        return losses
