"""Accelerate setup, base-pipeline loading, precision and memory switches, checks made before training,
and the output folder a run owns.

Everything here that can reject a run does so before anything is written. A run owns only what runs
of this tool recorded in the folder's manifest (:data:`MANIFEST_NAME`, see :func:`record_outputs`);
``overwrite_output_dir`` removes only those paths, only inside the folder, after every check passed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from torch import nn

from ..atomic import atomic_write_text, folder_write_problem
from ..quantized import is_quantized
from .args import ConfigError, ModelArgs, OptimArgs, TrainArgs, with_world_weights

__all__ = [
    "MANIFEST_NAME",
    "RUN_CONFIG_NAME",
    "cast_frozen_weights",
    "check_device",
    "check_environment",
    "check_model_source",
    "check_output_dir",
    "check_resolution",
    "claim_output_dir",
    "enable_memory_savers",
    "forget_outputs",
    "load_pipeline",
    "make_accelerator",
    "record_outputs",
    "recorded_outputs",
    "weight_dtype",
    "write_run_config",
]

RUN_CONFIG_NAME = "training_config.yaml"
"""The resolved config a run writes into its output_dir once its start succeeded; it identifies the run."""
MANIFEST_NAME = ".boft_diffusion_manifest.json"
"""Paths (relative to output_dir) that runs of this tool wrote there: the only ones overwrite removes."""
_SET_ASIDE = ".boft_diffusion_replaced"
"""Where overwrite moves an earlier run's outputs until the new run's start succeeded."""
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")
_STAGING = re.compile(r"^\.checkpoint-\d+\.(tmp|old)")  # unfinished checkpoint saves (checkpoint.py)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _distributed_cpu() -> bool:
    """Several processes (``accelerate launch``, ``torchrun``) on a machine without CUDA: use gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > 1 and "LOCAL_RANK" in os.environ and not torch.cuda.is_available()


def make_accelerator(train: TrainArgs) -> Accelerator:
    """An ``Accelerator`` for ``train``: accumulation, precision, tracker, project folders.

    Launched as several processes on a CPU-only machine, it runs data-parallel over gloo
    (accelerate itself would otherwise start independent single-process runs). accelerate keeps
    one precision per process: a second run in the same process (a notebook, tests) may change
    accumulation, tracker and folders, but a different ``mixed_precision`` needs a new process
    (a :class:`ConfigError` says so; accelerate's state is never reset through private calls).
    """
    project = ProjectConfiguration(
        project_dir=train.output_dir, logging_dir=str(Path(train.output_dir) / train.logging_dir)
    )
    try:
        return Accelerator(
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            mixed_precision=train.mixed_precision,
            log_with=None if train.report_to == "none" else train.report_to,
            project_config=project,
            cpu=_distributed_cpu(),
        )
    except ValueError as err:
        if "already been initialized" not in str(err):
            raise
        raise ConfigError(
            f"train.mixed_precision={train.mixed_precision}: this process already trained with another "
            "mixed precision, and accelerate keeps one per process; start a new process (e.g. restart "
            "the notebook kernel) for this run"
        ) from err


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype frozen weights are stored in under the accelerator's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def cast_frozen_weights(modules: Iterable[nn.Module | None], dtype: torch.dtype, device: Any = None) -> None:
    """Move ``modules`` to ``device`` with frozen weights in ``dtype``; trained ones stay float32."""
    for module in modules:
        if module is None:
            continue
        module.to(device)
        if any(is_quantized(m) for m in module.modules()):
            # A quantized model is not cast as a whole (its library refuses or would dequantize): its plain
            # frozen tensors are; the quantized weights keep the dtype they were loaded to compute in.
            for param in module.parameters():
                if not param.requires_grad and type(param.data) is torch.Tensor and param.is_floating_point():
                    param.data = param.data.to(dtype)
        elif any(p.dtype != dtype for p in module.parameters() if not p.requires_grad):
            module.to(dtype)  # (diffusers warns when a model casts itself; harmless here)
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()


def _has_accelerator_device() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return (
        torch.cuda.is_available()
        or bool(mps and mps.is_available())
        or bool(xpu and hasattr(xpu, "is_available") and xpu.is_available())
    )


def check_environment(train: TrainArgs, optim: OptimArgs) -> None:
    """Optional packages and hardware the config asks for: a clear error now, not mid-run."""
    if train.mixed_precision == "fp16" and not _has_accelerator_device():
        raise ConfigError(
            "train.mixed_precision=fp16 needs a GPU; this run would train on the CPU, where accelerate "
            "applies no fp16 autocast or loss scaling: use train.mixed_precision=bf16 or no"
        )
    if optim.optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "optim.optimizer=adamw_8bit needs bitsandbytes: pip install bitsandbytes (or use optim.optimizer=adamw)"
        )
    if train.enable_xformers_memory_efficient_attention:
        if importlib.util.find_spec("xformers") is None:
            raise ConfigError(
                "train.enable_xformers_memory_efficient_attention needs xformers: pip install xformers "
                "(or set it to false; PyTorch's SDPA attention is used then)"
            )
        if not torch.cuda.is_available():
            raise ConfigError(
                "train.enable_xformers_memory_efficient_attention needs a CUDA GPU; none is available"
            )
    for tracker, package in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        if train.report_to == tracker and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"train.report_to={tracker} needs {package}: pip install {package} (or report_to=none)"
            )


def check_model_source(name: str | None) -> None:
    """A local folder must be a diffusers pipeline; anything else must look like a hub id."""
    if name is None:
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ConfigError(
                f"model.pretrained_model_name_or_path={name!r} is not a diffusers pipeline folder "
                "(no model_index.json); save one with pipe.save_pretrained(folder)"
            )
        return
    if not _HUB_ID.match(name):
        raise ConfigError(
            f"model.pretrained_model_name_or_path={name!r} does not exist (and is not a hub id like 'org/model')"
        )


def _names_gpus(visible: str) -> bool:
    """Whether a ``CUDA_VISIBLE_DEVICES`` value selects GPUs ('' and '-1' select none)."""
    first = visible.split(",")[0].strip()
    return first.isdigit() or first.startswith(("GPU-", "MIG-"))


def check_device(accelerator: Accelerator, train: TrainArgs) -> None:
    """The device accelerate picked exists and suits ``train``: a clear error now, not a crash mid-setup.

    A device that does not exist (``ACCELERATE_TORCH_DEVICE=cuda:7``), GPUs asked for with
    ``CUDA_VISIBLE_DEVICES`` on a machine where PyTorch sees none (the run would silently train on
    the CPU), and ``mixed_precision=fp16`` on the CPU (accelerate applies neither fp16 autocast nor
    loss scaling there; bf16 works) raise :class:`ConfigError`.
    """
    device = accelerator.device
    chosen = os.environ.get("ACCELERATE_TORCH_DEVICE")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:
        origin = f" (ACCELERATE_TORCH_DEVICE={chosen})" if chosen else ""
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"The training device {device}{origin} is not usable on this machine: {reason}"
        ) from err
    if device.type != "cpu":
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if _names_gpus(visible) and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes"):
        why = (
            "this PyTorch is a CPU-only build"
            if torch.version.cuda is None
            else "PyTorch sees no CUDA device"
        )
        raise ConfigError(
            f"CUDA_VISIBLE_DEVICES={visible} asks for GPUs, but {why}: the run would train on the CPU. "
            "Install a CUDA build of PyTorch or fix CUDA_VISIBLE_DEVICES; set it empty to train on the CPU"
        )
    if train.mixed_precision == "fp16":
        raise ConfigError(
            "train.mixed_precision=fp16 needs a GPU; this run would train on the CPU, where accelerate "
            "applies no fp16 autocast or loss scaling: use train.mixed_precision=bf16 or no"
        )


def check_resolution(pipe: Any, resolution: int | None, key: str) -> None:
    """``resolution`` (pixels, square) must be a size ``pipe`` can encode and sample.

    Stable Diffusion pipelines sample only multiples of 8, and the VAE maps a size to latents only
    when it is a multiple of its scale factor (else it silently crops). The UNet needs no multiple:
    it forwards the upsampling size, so any latent size works.
    """
    if resolution is None:
        return
    vae_factor = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    multiple = math.lcm(8, int(vae_factor))
    if resolution % multiple:
        nearest = max(multiple, round(resolution / multiple) * multiple)
        raise ConfigError(
            f"{key}={resolution} cannot be used with this model: it needs a multiple of {multiple} "
            f"(VAE scale factor {vae_factor}; the pipeline samples multiples of 8), e.g. {nearest}"
        )


def load_pipeline(model: ModelArgs, torch_dtype: torch.dtype | None = None) -> Any:
    """The base pipeline of a supported family (the embedded tiny one without a model path).

    Failures (missing hub access, a folder of an unsupported pipeline type) raise :class:`ConfigError`.
    With ``model.quantization``, the components it names are loaded quantized (``torch_dtype``, default
    float32, is then the dtype they compute in; see :mod:`.quantize`).
    """
    from diffusers import DiffusionPipeline

    from ..families import UnsupportedFamilyError, family_of
    from .quantize import (
        check_quantization,
        component_names,
        pipeline_quantization_config,
        quantize_components,
    )

    quant = model.quantization
    check_quantization(quant)
    quantized = quant.backend != "none"
    if model.pretrained_model_name_or_path is None:
        pipe = _tiny_pipeline(model)
        if quantized:
            names = component_names(quant, family_of(pipe))
            quantize_components(pipe, names, quant, torch_dtype or torch.float32)
    else:
        check_model_source(model.pretrained_model_name_or_path)
        source = model.pretrained_model_name_or_path
        local = Path(source).expanduser()
        try:
            pipe = DiffusionPipeline.from_pretrained(
                str(local) if local.exists() else source,
                revision=model.revision,
                variant=model.variant,
                torch_dtype=torch_dtype,
                **_no_safety_checker(str(local) if local.exists() else None),
                **(
                    {"quantization_config": pipeline_quantization_config(quant, torch_dtype or torch.float32)}
                    if quantized
                    else {}
                ),
            )
        except Exception as err:
            raise ConfigError(f"Could not load a Stable Diffusion pipeline from {source!r}: {err}") from err
        try:
            family = family_of(pipe)
        except UnsupportedFamilyError as err:
            raise ConfigError(f"model.pretrained_model_name_or_path={source!r}: {err}") from None
        if quantized:
            component_names(quant, family)  # a text encoder the model does not have
        if model.prediction_type is not None:
            pipe.scheduler.register_to_config(prediction_type=model.prediction_type)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_pipeline(model: ModelArgs) -> Any:
    """The embedded tiny pipeline of ``model.tiny_family``, built by the family with
    ``model.tiny_pipeline_weights``; random weights chosen by default are said in one line (from the main
    process)."""
    from ..families import get_family

    if (
        model.tiny_weights is None
        and model.tiny_pipeline_weights == "random"
        and os.environ.get("RANK", "0") == "0"
    ):
        print(
            f"model.tiny_family={model.tiny_family}: random tiny weights (seed {model.tiny_seed}); "
            f"only the {with_world_weights()}-shaped tiny pipeline has world weights",
            flush=True,
        )
    return get_family(model.tiny_family).tiny_pipeline(
        model.tiny_seed, weights=model.tiny_pipeline_weights, prediction_type=model.prediction_type
    )


def check_family_keys(cfg: Any, family: Any) -> None:
    """Refuse a config key that belongs to another model family than the loaded pipeline's."""
    t, boft = cfg.train, getattr(cfg, "boft", None)
    flow = family.objective == "flow"
    if flow and t.snr_gamma:
        raise ConfigError(
            f"train.snr_gamma is for DDPM families (sd, sdxl); {family.title} trains by flow matching: use "
            "train.weighting_scheme (logit_normal, mode, sigma_sqrt, cosmap) instead"
        )
    if not flow and t.weighting_scheme != "none":
        raise ConfigError(
            f"train.weighting_scheme={t.weighting_scheme} is for flow-matching families (sd3, flux); "
            f"{family.title} is a DDPM model: use train.snr_gamma instead"
        )
    if family.denoiser == "unet" and getattr(boft, "transformer_target_modules", None):
        raise ConfigError(
            f"boft.transformer_target_modules is for transformer families (sd3, flux); {family.title} has a UNet: "
            "use boft.unet_target_modules"
        )


def _no_safety_checker(folder: str | None) -> dict[str, Any]:
    """``safety_checker=None`` for pipelines that have one (SD 1.x/2.x), nothing for those that do not."""
    if folder is not None:
        index = Path(folder) / "model_index.json"
        try:
            if "safety_checker" not in json.loads(index.read_text()):
                return {}
        except (OSError, ValueError):
            pass
    return {"safety_checker": None, "requires_safety_checker": False}


def enable_memory_savers(train: TrainArgs, unet: nn.Module, *text_encoders: nn.Module | None) -> None:
    """Gradient checkpointing (the denoiser and the trained text encoders), xformers attention and TF32,
    as ``train`` asks."""
    if train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for text_encoder in text_encoders:
            if text_encoder is not None:
                text_encoder.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
    if train.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True


# --- the output folder ----------------------------------------------------------------------------
def _entry(folder: Path, path: str | os.PathLike[str]) -> str:
    """``path`` (relative to ``folder``, spelled through ``folder`` as ``folder / "a"`` is, or absolute
    inside it) as a manifest entry (``a/b``).

    Judged by its spelling only: links are judged when something is about to be removed.
    """
    path = Path(path)
    prefix = Path(folder).parts
    if not path.is_absolute() and not Path(folder).is_absolute() and path.parts[: len(prefix)] == prefix:
        path = Path(*path.parts[len(prefix) :]) if len(path.parts) > len(prefix) else Path()
    if path.is_absolute():
        try:
            path = Path(os.path.abspath(path)).relative_to(os.path.abspath(folder))
        except ValueError:
            raise ValueError(f"{path} is outside the output folder {folder}") from None
    if ".." in path.parts or not path.parts or path.is_absolute():
        raise ValueError(f"{path} is outside the output folder {folder} (or is the folder itself)")
    return path.as_posix()


def _read_manifest(folder: Path) -> list[str]:
    file = folder / MANIFEST_NAME
    if not file.is_file():
        return []
    try:
        entries = json.loads(file.read_text(encoding="utf-8"))["outputs"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        warnings.warn(
            f"{file} is unreadable ({err}); nothing in {folder} counts as written by a run", stacklevel=3
        )
        return []
    return [e for e in entries if isinstance(e, str)]


def _write_manifest(folder: Path, entries: Iterable[str]) -> None:
    data = {"tool": "boft-diffusion", "version": 1, "outputs": sorted(set(entries) - {MANIFEST_NAME})}
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(data, indent=1) + "\n")


def record_outputs(output_dir: str | Path, *paths: str | os.PathLike[str]) -> None:
    """Add ``paths`` to the manifest of ``output_dir``: they were written by a run of this tool.

    Call it on the main process right before (or after) writing each output; ``paths`` are relative
    to ``output_dir`` or absolute inside it (a path outside raises ``ValueError``). A folder covers
    everything below it. Without ``paths``, it just creates the manifest: the folder holds a run now.
    Only recorded paths are ever removed by ``overwrite_output_dir``.
    """
    folder = Path(output_dir)
    new = [_entry(folder, p) for p in paths]
    _write_manifest(folder, [*_read_manifest(folder), *new])


def forget_outputs(output_dir: str | Path, *paths: str | os.PathLike[str]) -> None:
    """Remove ``paths`` from the manifest (the inverse of :func:`record_outputs`), e.g. after deleting them."""
    folder = Path(output_dir)
    if not (folder / MANIFEST_NAME).is_file():
        return
    gone = {_entry(folder, p) for p in paths}
    _write_manifest(folder, [e for e in _read_manifest(folder) if e not in gone])


def _leads_nowhere_else(root: Path, path: Path) -> bool:
    """Whether ``path`` (spelled inside ``root``) really lies there: no link on the way, not ``root``."""
    rel = path.relative_to(root)
    return bool(rel.parts) and path.resolve() == root.resolve() / rel


def recorded_outputs(output_dir: str | Path) -> list[Path]:
    """What runs of this tool wrote into ``output_dir`` and that still lies inside it (outermost only).

    That is every manifest entry, plus (once there is a manifest) complete checkpoints
    (``checkpoint-<N>`` holding the checkpoint marker), unfinished checkpoint saves and outputs set
    aside by an interrupted overwrite. An entry that leaves the folder (``..``, an absolute path, a
    link anywhere on its way) is never returned, so it is never removed.
    """
    from .checkpoint import CHECKPOINT_MARKER  # here: checkpoint.py may import this module

    folder = Path(output_dir)
    if not (folder / MANIFEST_NAME).is_file():
        return []
    candidates = set()
    for entry in _read_manifest(folder):
        with contextlib.suppress(ValueError):
            candidates.add(folder / _entry(folder, entry))
    for path in folder.iterdir():
        name = path.name
        marked = _CHECKPOINT.match(name) and (path / CHECKPOINT_MARKER).is_file()
        if marked or _STAGING.match(name) or name == _SET_ASIDE:
            candidates.add(path)
    found = sorted(p for p in candidates if p.exists() and _leads_nowhere_else(folder, p))
    return [p for p in found if not any(parent in found for parent in p.parents)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _check_nothing_foreign(folder: Path, writes: Sequence[str]) -> None:
    """Refuse when a path this run writes (``writes``: names or globs) holds something no run recorded."""
    ours = set(recorded_outputs(folder))
    for pattern in writes:
        for path in sorted(folder.glob(pattern)):
            if path not in ours and not ours.intersection(path.parents):
                raise ConfigError(
                    f"train.output_dir {folder} holds {path.relative_to(folder).as_posix()}, which no "
                    "boft-diffusion run recorded writing; this run would write over it, and overwrite only "
                    "removes what runs recorded: move it away or choose another train.output_dir"
                )


def _leaves(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        out.update(_leaves(value, f"{prefix}{key}."))
    return out


def check_output_dir(
    output_dir: str | Path,
    config: dict[str, Any],
    identity: Sequence[str],
    overwrite: bool,
    writes: Sequence[str] = (),
) -> None:
    """Refuse an ``output_dir`` that cannot be written, or holds a different run, unless ``overwrite``.

    Two runs are the same when the ``identity`` keys of their configs agree (e.g. model, data,
    adapter and seed): a resumed or extended run may change steps, learning rate or logging.
    A non-empty folder holding neither a run config nor a manifest holds something else and is
    refused as well. With ``overwrite`` (or a manifest but no run config: a start that failed),
    ``writes`` (paths or globs relative to ``output_dir``) must not hold anything no run recorded.
    """
    folder = Path(output_dir)
    problem = folder_write_problem(folder)
    if problem:
        raise ConfigError(f"train.output_dir {folder} {problem}")
    if not folder.exists() or not any(folder.iterdir()):
        return
    hint = "choose another train.output_dir or pass train.overwrite_output_dir=true"
    saved_path = folder / RUN_CONFIG_NAME
    if not overwrite and saved_path.is_file():
        _check_same_run(folder, saved_path, config, identity, hint)
        return
    if not overwrite and not (folder / MANIFEST_NAME).is_file():
        raise ConfigError(f"train.output_dir {folder} is not empty and holds no boft-diffusion run; {hint}")
    _check_nothing_foreign(folder, writes)


def _check_same_run(
    folder: Path, saved_path: Path, config: dict[str, Any], identity: Sequence[str], hint: str
) -> None:
    from omegaconf import OmegaConf

    saved, current = _leaves(OmegaConf.to_container(OmegaConf.load(saved_path))), _leaves(config)
    keys = [k for k in {**saved, **current} if any(k == i or k.startswith(i + ".") for i in identity)]
    diffs = [k for k in keys if json.dumps(saved.get(k)) != json.dumps(current.get(k))]
    if diffs:
        detail = ", ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in diffs[:3])
        raise ConfigError(f"train.output_dir {folder} holds a different run ({detail}); {hint}")


def _make_room(folder: Path, overwrite: bool, keep: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Create ``folder`` and its manifest, drop stale staging; with ``overwrite`` set earlier outputs
    aside (but not ``keep``, this run's inputs). Returns the entries set aside."""
    ours = recorded_outputs(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stale = [p for p in ours if _STAGING.match(p.name) or p.name == _SET_ASIDE]
    for path in stale:
        _remove(path)
    record_outputs(folder)
    if not overwrite:
        return []
    inputs = [Path(k).expanduser().resolve() for k in keep]
    moved = []
    for path in ours:
        real = path.resolve()
        if path in stale or any(k == real or real in k.parents or k in real.parents for k in inputs):
            continue
        rel = path.relative_to(folder)
        (folder / _SET_ASIDE / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, folder / _SET_ASIDE / rel)
        moved.append(rel.as_posix())
    return moved


def _put_back(folder: Path, moved: Sequence[str]) -> None:
    """Undo :func:`_make_room`: what the failed start wrote in their place goes, the earlier outputs return."""
    for rel in moved:
        if (folder / rel).exists() or (folder / rel).is_symlink():
            _remove(folder / rel)
        os.replace(folder / _SET_ASIDE / rel, folder / rel)
    shutil.rmtree(folder / _SET_ASIDE)


@contextlib.contextmanager
def claim_output_dir(
    accelerator: Accelerator | None, train: TrainArgs, keep: Iterable[str | os.PathLike[str]] = ()
) -> Iterator[Path]:
    """Make ``train.output_dir`` ready for a run whose checks all passed; the block is the run's start.

    The main process creates the folder and its manifest and removes unfinished checkpoint saves.
    With ``overwrite_output_dir`` it first moves what earlier runs recorded aside (except ``keep``:
    inputs of this run that lie there, e.g. the checkpoint it resumes from). When the block succeeds
    they are deleted; when it fails (a resume that does not load, out of memory) they are put back,
    so a start that fails loses nothing. ``accelerator=None``: a single process.
    """
    folder = Path(train.output_dir)
    main = accelerator is None or accelerator.is_main_process
    moved = _make_room(folder, train.overwrite_output_dir, keep) if main else []
    if accelerator is not None:
        accelerator.wait_for_everyone()
    try:
        yield folder
    except BaseException:
        if moved:
            _put_back(folder, moved)
        raise
    if moved:
        shutil.rmtree(folder / _SET_ASIDE)
        forget_outputs(folder, *[rel for rel in moved if not (folder / rel).exists()])


def write_run_config(output_dir: str | Path, config_yaml: str) -> Path:
    """Write the resolved config (atomically) and record it; do it once the run's start succeeded."""
    record_outputs(output_dir, RUN_CONFIG_NAME)
    return atomic_write_text(Path(output_dir) / RUN_CONFIG_NAME, config_yaml)
