"""DreamBooth with BOFT: teach a Stable Diffusion model a subject from a handful of photos.

    boft-diffusion train dreambooth --config configs/dreambooth/tiny.yaml [section.key=value ...]

Per step, with the subject's latents ``x0`` and prompt embedding ``c``:
``loss = || f(x_t, t, c) - target ||^2`` (target: noise or velocity, optionally Min-SNR weighted);
with prior preservation each batch also holds as many class images, whose loss is added times
``prior_loss_weight``. Only the BOFT rotations (and scales, biases) train. The run's life cycle
(``setup -> train -> save``) is :class:`~boft_diffusion.training.recipe.TrainingRecipe`'s; this
module supplies the data, the adapters, the loss and the model card.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from ..atomic import folder_write_problem
from ..data import (
    IMAGE_EXTENSIONS,
    LATENT_CACHE_NAME,
    PROMPT_EMBEDDINGS_NAME,
    BucketBatchSampler,
    Concept,
    ConceptImages,
    DreamBoothDataset,
    LatentCache,
    assign_buckets,
    auto_buckets,
    bucket_table,
    collate_dreambooth,
    concept_images,
    dreambooth_prompts,
    generate_class_images,
    image_to_tensor,
    list_images,
    load_concepts,
    load_mask,
    load_rgb,
    parse_bucket_sizes,
    vae_fingerprint,
)
from ..families import get_family
from ..inject import apply_adapter_plan
from ..io import load_boft_weights
from ..metrics import (
    DreamBoothProbe,
    Measurement,
    MetricsError,
    Scorer,
    ScorerError,
    WorldScorer,
    load_scorer,
    measure_dreambooth,
)
from ..tiny import TINY_CLASS_PROMPT, make_instance_images
from ..training.args import (
    ConfigError,
)
from ..training.card import CardParts
from ..training.noise import (
    diffusion_loss,
    noise_latents,
)
from ..training.prompt_cache import PromptCache
from ..training.recipe import TrainingRecipe, TrainResult
from ..training.setup import check_resolution, load_pipeline, record_outputs
from ..training.sharding import is_sharded
from ..world import parse_caption
from .dreambooth_config import (
    DreamBoothConfig,
    DreamBoothDataArgs,
    DreamBoothMetricsArgs,
)

__all__ = [
    "CONFIG_CLASS",
    "DreamBoothConfig",
    "DreamBoothDataArgs",
    "DreamBoothMetricsArgs",
    "DreamBoothRecipe",
    "TrainResult",
    "run",
]


CONFIG_CLASS = DreamBoothConfig
"""The recipe's config class (``boft-diffusion train dreambooth`` loads it)."""


CARD_HYPERPARAMETERS = (
    "optim.learning_rate", "optim.lr_scheduler", "optim.lr_warmup_steps", "train.max_train_steps",
    "train.train_batch_size", "train.gradient_accumulation_steps", "train.mixed_precision", "train.seed",
    "data.resolution", "data.with_prior_preservation", "data.class_prompt", "data.num_class_images",
    "data.prior_loss_weight",
)  # fmt: skip
"""Config keys the model card lists (besides every ``boft.*`` key)."""


class DreamBoothRecipe(TrainingRecipe):
    """DreamBooth: instance (and class) images, BOFT on the UNet (and text encoder), the denoising loss."""

    cfg: DreamBoothConfig
    recipe_name = "DreamBooth"

    def __init__(self, cfg: DreamBoothConfig) -> None:
        super().__init__(cfg)
        self.concepts: list[Concept] = []
        """What the run trains: data.dataset_file's concepts, or the data.* keys' one (``check_task_inputs``)."""
        self.photos: list[list[Path] | None] = []
        """Each concept's photos (checked in ``check_task_inputs``); ``None``: toy images are generated."""
        self.scorer: Scorer | None = None
        self.probe: DreamBoothProbe | None = None
        self.references: list[Path] = []
        """The first concept's instance images, what subject fidelity compares samples with (set by ``build``)."""
        self.latents: dict[Any, torch.Tensor] | None = None
        """``data.cache_latents``: every training image's VAE posterior parameters (set by ``build``)."""
        self.latent_cache: LatentCache | None = None
        self.prompt_cache: PromptCache | None = None
        """``data.cache_prompt_embeddings``: the run's prompt embeddings (checked by ``check_pipeline``)."""

    # --- check -----------------------------------------------------------------------------------
    @property
    def instance_images(self) -> list[Path] | None:
        """The first concept's photos (checked in ``check_task_inputs``); ``None``: toy images are generated."""
        return self.photos[0] if self.photos else None

    @property
    def masks(self) -> str:
        """How instance images carry loss masks: ``files`` when a concept has a mask folder, else data.masks."""
        return "files" if any(c.mask_dir for c in self.concepts) else self.cfg.data.masks

    def read_concepts(self) -> list[Concept]:
        """The concepts of data.dataset_file (checked), or the one of data.instance_data_dir etc."""
        data = self.cfg.data
        if data.dataset_file is not None:
            return load_concepts(data.dataset_file, data.with_prior_preservation)
        folder, classes, masks = (
            Path(p).expanduser() if p else None
            for p in (data.instance_data_dir, data.class_data_dir, data.mask_dir)
        )
        return [
            Concept(
                name=folder.name if folder else "instance_images",
                instance_prompt=data.instance_prompt,
                instance_data_dir=folder,
                class_prompt=data.class_prompt,
                class_data_dir=classes,
                num_class_images=data.num_class_images,
                mask_dir=masks,
            )
        ]

    def class_folder(self, concept: Concept | None = None) -> Path:
        """Where ``concept``'s (default: the first one's) class images are: its class_data_dir, else
        <output_dir>/class_images (with data.dataset_file: <output_dir>/class_images/<name>)."""
        concept = concept or self.concepts[0]
        out = Path(self.cfg.train.output_dir) / "class_images"
        if concept.class_data_dir is not None:
            return concept.class_data_dir
        return out / concept.folder_name if self.cfg.data.dataset_file else out

    def check_task_inputs(self) -> None:
        data = self.cfg.data
        self.concepts = self.read_concepts()
        if data.alpha_mask and self.masks == "files":
            raise ConfigError(
                "data.alpha_mask is set and a concept of data.dataset_file gives a mask_dir: give one"
            )
        self.photos = []
        for concept in self.concepts:
            if concept.instance_data_dir is None:
                self.photos.append(None)
                continue
            self.photos.append(concept_images(concept, data.caption_extension))
            if concept.mask_dir or data.alpha_mask:  # every mask there, readable and of its image's size
                for image in self.photos[-1]:
                    load_mask(image, concept.mask_dir)
        if data.with_prior_preservation:
            for concept in self.concepts:
                self._check_class_folder(concept)
        self._check_metrics()

    def _check_metrics(self) -> None:
        """Resolve ``metrics.scorer`` and the probe; a bad scorer path or prompt fails here, nothing written."""
        cfg, m = self.cfg, self.cfg.metrics
        tiny = cfg.model.pretrained_model_name_or_path is None
        spec = ("world" if tiny else "none") if m.scorer == "auto" else m.scorer
        if spec == "none":
            self.scorer = self.probe = None
            return
        first = self.concepts[0]
        class_prompt = m.class_prompt or first.class_prompt or (TINY_CLASS_PROMPT if tiny else None)
        if class_prompt is None:
            key = "the first concept's class_prompt" if cfg.data.dataset_file else "data.class_prompt"
            raise ConfigError(f"metrics: class drift needs a class prompt: set {key} or metrics.class_prompt")
        try:
            self.scorer = load_scorer(spec)
            self.probe = DreamBoothProbe(
                first.instance_prompt, class_prompt, tuple(m.context_prompts), m.num_images, m.seed,
                m.num_inference_steps, m.guidance_scale,
            )  # fmt: skip
        except (MetricsError, ScorerError) as err:
            raise ConfigError(f"metrics: {err}") from None
        if isinstance(self.scorer, WorldScorer):  # it reads only what a world caption states
            for prompt in m.context_prompts:
                if not set(parse_caption(prompt)) - {"subject"}:
                    raise ConfigError(
                        f"metrics.context_prompts: {prompt!r} states no context the world scorer can check "
                        "(e.g. 'a photo of sks toy on a striped blue background'); use a clip scorer for other prompts"
                    )

    def measures(self) -> bool:
        return self.probe is not None

    def measure(self) -> Measurement:
        """The probe (the first concept); with data.dataset_file every other concept's instance prompt too,
        its samples scored against its own photos (per_prompt)."""
        references = [load_rgb(path) for path in self.references]
        others: dict[str, list[Any]] = {}
        for concept, photos in list(zip(self.concepts, self.photos))[1:]:
            others.setdefault(concept.instance_prompt, []).extend(load_rgb(path) for path in photos or [])
        return measure_dreambooth(self.pipe, self.probe, references, self.scorer, others)

    def measure_info(self) -> dict[str, Any]:
        info = {"scorer": self.scorer.name, "probe": asdict(self.probe)}
        if self.cfg.data.dataset_file is not None:  # say which concept the metrics are of
            info["concepts"] = [
                {
                    "name": c.name, "instance_prompt": c.instance_prompt, "images": len(photos or []),
                    "measured": "subject_fidelity, prompt_fidelity, class_drift" if k == 0
                    else "subject_fidelity of its instance prompt, in per_prompt",
                }
                for k, (c, photos) in enumerate(zip(self.concepts, self.photos))
            ]  # fmt: skip
        return info

    def _check_class_folder(self, concept: Concept) -> None:
        """``concept``'s class images are there already, or their folder can be created and filled."""
        folder = self.class_folder(concept)
        if folder.is_dir():
            present = sum(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())
            if present >= self._num_class_images(concept):
                return  # nothing to generate: a read-only folder is fine
        problem = folder_write_problem(folder)
        if problem:
            key = "class_data_dir" if concept.source else "data.class_data_dir"
            raise concept.problem(f"{key}: the class image folder {folder} {problem}")

    def _num_class_images(self, concept: Concept) -> int:
        return concept.num_class_images or self.cfg.data.num_class_images

    def planned_outputs(self) -> list[str]:
        data = self.cfg.data
        generated = (
            ["instance_images"] if data.instance_data_dir is None and data.dataset_file is None else []
        )
        if self.cfg.data.cache_latents and self.cfg.data.latent_cache_dir is None:
            generated.append(LATENT_CACHE_NAME)
        if self.cfg.data.cache_prompt_embeddings and self.prompt_cache_path().parent == Path(
            self.cfg.train.output_dir
        ):
            generated.append(PROMPT_EMBEDDINGS_NAME)
        return super().planned_outputs() + generated

    def input_paths(self) -> list[str | Path]:
        data = self.cfg.data
        folders = (data.instance_data_dir, data.class_data_dir, data.mask_dir, data.latent_cache_dir)
        if data.dataset_file is not None:
            folders += (data.dataset_file,) + tuple(
                p for c in self.concepts for p in (c.instance_data_dir, c.class_data_dir, c.mask_dir)
            )
        return [*super().input_paths(), *(p for p in folders if p)]

    # --- build -----------------------------------------------------------------------------------
    def build(self) -> None:
        """Instance and class images (generating what is missing), adapters, the dataloader."""
        instance = [self._instance_images() if photos is None else photos for photos in self.photos]
        self.references = instance[0]
        classes = self._class_images()
        if self.cfg.data.dataset_file is not None and self.accelerator.is_main_process:
            print(self._concept_table(instance, classes))
        self.components = self._add_adapters()
        if self.cfg.data.cache_prompt_embeddings:
            if self.prompt_cache is None:
                self._check_prompt_cache()
            out = Path(self.cfg.train.output_dir)
            self.prompt_cache.build(
                self.training_prompts(instance, classes), self.accelerator, self.cfg.data.resolution, out
            )
        self._dataloader(instance, classes)

    def latent_cache_dir(self) -> Path:
        folder = self.cfg.data.latent_cache_dir
        return Path(folder).expanduser() if folder else Path(self.cfg.train.output_dir) / LATENT_CACHE_NAME

    def _cached_latents(self, pairs: list[tuple[Path, tuple[int, int]]]) -> dict[Any, torch.Tensor]:
        """Every (training image, size)'s VAE posterior from the latent cache, encoding (main process) what is
        missing."""
        data, vae = self.cfg.data, self.pipe.vae
        cache = LatentCache(self.latent_cache_dir(), vae_fingerprint(vae), "center")

        @torch.no_grad()
        def encode(paths: list[Path], size: tuple[int, int]) -> torch.Tensor:
            pixels = torch.stack([image_to_tensor(p, size, center_crop=True) for p in paths])
            return vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.parameters

        def fill() -> None:
            cache.fill(pairs, encode, data.sample_batch_size)
            if cache.encoded:
                print(f"Latent cache {cache.folder}: {cache.encoded} of {len(pairs)} images encoded")

        if self.cfg.data.latent_cache_dir is None:
            self.write_output_folder(cache.folder, fill)
        else:
            self.on_main_process(fill)
        self.latent_cache = cache
        return cache.fill(pairs, encode, data.sample_batch_size)  # every process: all there now

    def _instance_images(self) -> list[Path]:
        """Toy images of the embedded subject, generated into <output_dir>/instance_images."""
        cfg = self.cfg
        folder = Path(cfg.train.output_dir) / "instance_images"
        data = cfg.data
        self.write_output_folder(
            folder,
            lambda: make_instance_images(
                folder, data.num_generated_images, cfg.model.tiny_seed, data.resolution
            ),
        )
        return list_images(folder, "instance", cfg.data.caption_extension)

    def _concept_table(self, instance: list[list[Path]], classes: list[list[Path]] | None) -> str:
        """One line per concept: name, photos, repeats, class images."""
        lines = [f"Concepts ({len(self.concepts)}, data.dataset_file {self.cfg.data.dataset_file}):"]
        for k, concept in enumerate(self.concepts):
            extra = f", {len(classes[k])} class images ({concept.class_prompt!r})" if classes else ""
            lines.append(
                f"  {concept.name}: {len(instance[k])} images x {concept.repeats} repeats{extra}; "
                f"prompt {concept.instance_prompt!r}"
            )
        if self.probe is not None and len(self.concepts) > 1:
            lines.append(
                f"  metrics: subject and prompt fidelity and class drift of {self.concepts[0].name!r}; every "
                "concept's subject fidelity (its prompt, its photos) per prompt"
            )
        return "\n".join(lines)

    def _class_images(self) -> list[list[Path]] | None:
        """Each concept's class images, generated where missing; those generated inside output_dir are
        recorded as ours."""
        if not self.cfg.data.with_prior_preservation:
            return None
        with warnings.catch_warnings():  # the prompt-embedding cache beside the class images is no image
            warnings.filterwarnings(
                "ignore", f"Skipping .*{re.escape(PROMPT_EMBEDDINGS_NAME)}: not a readable image"
            )
            return [self._fill_class_folder(concept) for concept in self.concepts]

    def _fill_class_folder(self, concept: Concept) -> list[Path]:
        data, out, accelerator = self.cfg.data, Path(self.cfg.train.output_dir), self.accelerator
        folder, count = self.class_folder(concept), self._num_class_images(concept)

        def fill() -> None:
            inside = folder.resolve().is_relative_to(out.resolve())
            before = set(folder.iterdir()) if folder.is_dir() else None
            if inside and before is None:
                record_outputs(out, folder)  # a folder this run creates
            generate_class_images(
                self.pipe, folder, concept.class_prompt, count, data.sample_batch_size,
                data.class_inference_steps, data.resolution, self.cfg.train.seed,
                accelerator.is_local_main_process, data.class_context_prompts,
            )  # fmt: skip
            if inside and before is not None:
                record_outputs(out, *(set(folder.iterdir()) - before))  # images added to an existing folder

        self.on_main_process(fill)
        return list_images(folder, "class", data.caption_extension)[:count]

    def check_pipeline(self) -> None:
        self._plan_adapters()
        if self.cfg.data.cache_prompt_embeddings:
            self._check_prompt_cache()

    # --- prompt-embedding cache (data.cache_prompt_embeddings) -------------------------------------
    def prompt_cache_path(self) -> Path:
        """``prompt_embeddings.safetensors`` in data.class_data_dir (with prior preservation), else output_dir."""
        data = self.cfg.data
        if data.with_prior_preservation and data.class_data_dir:
            return Path(data.class_data_dir).expanduser() / PROMPT_EMBEDDINGS_NAME
        return Path(self.cfg.train.output_dir) / PROMPT_EMBEDDINGS_NAME

    def training_prompts(
        self, instance: list[list[Path]] | None = None, classes: list[list[Path]] | None = None
    ) -> list[str]:
        """Every distinct prompt the dataset gives (``instance`` / ``classes``: each concept's images; default:
        the user's instance images, if any, and the class images already in each class folder)."""
        data, prompts = self.cfg.data, []
        for k, concept in enumerate(self.concepts):
            images = instance[k] if instance is not None else (self.photos[k] or [])
            class_prompt = concept.class_prompt if data.with_prior_preservation else None
            found = classes[k] if classes is not None else None
            if found is None and class_prompt:
                folder = self.class_folder(concept)
                found = (
                    sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
                    if folder.is_dir()
                    else []
                )[: self._num_class_images(concept)]
            prompts += dreambooth_prompts(
                images, concept.instance_prompt, data.caption_extension, class_prompt, found or []
            )
        contexts = data.class_context_prompts if data.with_prior_preservation and data.class_prompt else []
        return list(dict.fromkeys([*prompts, *contexts]))

    def _overwritten(self, path: Path) -> bool:
        """Whether ``train.overwrite_output_dir`` sets ``path`` aside as an earlier run's output."""
        out = Path(self.cfg.train.output_dir).resolve()
        if not self.cfg.train.overwrite_output_dir or not path.resolve().is_relative_to(out):
            return False
        kept = [Path(p).expanduser().resolve() for p in self.input_paths()]
        return not any(path.resolve().is_relative_to(k) for k in kept)

    def _check_prompt_cache(self) -> None:
        """A prompt-embedding file already there must be of this family, these encoders and prompts (else a
        ConfigError saying which differs); a missing one must be writable. Nothing is written."""
        path = self.prompt_cache_path()
        elsewhere = (
            "data.class_data_dir" if path.parent != Path(self.cfg.train.output_dir) else "train.output_dir"
        )
        self.prompt_cache = PromptCache(self.family, self.pipe, path, elsewhere)
        self.prompt_cache.check(self.training_prompts(), self._overwritten(path))

    def text_encoders_on_device(self) -> contextlib.AbstractContextManager[None]:
        """The offloaded text encoders back on the accelerator for the block (sampling calls the pipeline)."""
        if self.prompt_cache is None:
            return contextlib.nullcontext()
        return self.prompt_cache.encoders_on(self.accelerator.device)

    def validate(self, name: str, tag: str = "validation") -> Path | None:
        with self.text_encoders_on_device():
            return super().validate(name, tag)

    def measure_run(self, stage: str) -> dict[str, Any] | None:
        with self.text_encoders_on_device():
            return super().measure_run(stage)

    def _plan_adapters(self) -> dict[str, Any]:
        """The BOFT adapter of each trained component, checked against it (nothing is changed yet)."""
        boft, pipe, family = self.cfg.boft, self.pipe, self.family
        denoiser_targets = (
            boft.unet_target_modules if family.denoiser == "unet" else boft.transformer_target_modules
        )
        targets = {family.denoiser: denoiser_targets or list(family.default_targets[family.denoiser])}
        if (
            boft.train_text_encoder
        ):  # the family's trainable text encoders (SDXL: both CLIPs; SD3, Flux: no T5)
            targets |= {name: boft.text_encoder_target_modules for name in family.trained_text_encoders}
        keys = {
            name: f"boft.{family.denoiser if name == family.denoiser else 'text_encoder'}_target_modules"
            for name in targets
        }
        return self.plan_adapters(
            {
                name: (getattr(pipe, name), boft.to_config(modules), keys[name])
                for name, modules in targets.items()
            }
        )

    def _add_adapters(self) -> dict[str, nn.Module]:
        """BOFT on the (frozen) UNet and text encoder; only adapter tensors train."""
        plans = self._plan_adapters()  # every component checked before any is changed
        return {name: apply_adapter_plan(getattr(self.pipe, name), plan) for name, plan in plans.items()}

    def _dataloader(self, instance: list[list[Path]], classes: list[list[Path]] | None) -> None:
        data, t = self.cfg.data, self.cfg.train
        every = list(dict.fromkeys(p for photos in instance for p in photos))  # buckets span the concepts
        sizes = self._buckets(every) if data.buckets else None
        concepts = [
            ConceptImages(
                photos,
                c.instance_prompt,
                classes[k] if classes else (),
                c.class_prompt,
                c.repeats,
                c.mask_dir,
            )
            for k, (c, photos) in enumerate(zip(self.concepts, instance))
        ]
        dataset = DreamBoothDataset.of_concepts(
            concepts, data.resolution, data.caption_extension, center_crop=data.center_crop,
            random_flip=data.random_flip, seed=t.seed, masks=self.masks, sizes=sizes,
        )  # fmt: skip
        if data.cache_latents:
            dataset.latents = self.latents = self._cached_latents(dataset.pairs())
        tokenize = (
            None
            if self.prompt_cache is not None
            else partial(self.family.tokenize, self.family.tokenizers(self.pipe))
        )
        batches = None
        if sizes is not None:  # one bucket per batch
            order = [dataset.size_at(i) for i in range(len(dataset))]
            batches = BucketBatchSampler(order, t.train_batch_size, t.seed)
        self.make_dataloader(dataset, partial(collate_dreambooth, tokenize=tokenize), batches)

    def _buckets(self, instance: list[Path]) -> dict[Path, tuple[int, int]]:
        """Each instance image's bucket (``data.buckets``), every bucket checked against the model; the table
        of the buckets in use printed by the main process."""
        data = self.cfg.data
        explicit = parse_bucket_sizes(data.bucket_sizes)
        vae_factor = getattr(self.pipe, "vae_scale_factor", None) or 8
        multiple = math.lcm(8, int(vae_factor))
        step = data.bucket_step or max(multiple, data.resolution // 8 // multiple * multiple)
        buckets = explicit or auto_buckets(data.resolution, step)
        for width, height in buckets:
            check_resolution(self.pipe, width, f"data.buckets {width}x{height}: its width")
            check_resolution(self.pipe, height, f"data.buckets {width}x{height}: its height")
        assigned = assign_buckets(instance, buckets, explicit=bool(explicit))
        if self.accelerator.is_main_process:
            print(bucket_table(assigned))
        return assigned

    # --- train -----------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Denoising loss of one batch (instance half + ``prior_loss_weight`` x class half)."""
        cfg, scheduler = self.cfg, self.noise_scheduler
        with torch.no_grad():
            if "latent_parameters" in batch:  # data.cache_latents: the cached posterior, sampled afresh
                vae = self.pipe.vae
                params = batch["latent_parameters"].to(device=vae.device, dtype=vae.dtype)
                latents = self.family.latents_from(vae, DiagonalGaussianDistribution(params))
            else:
                latents = self.family.encode_latents(self.pipe.vae, batch["pixel_values"])
        family = self.family
        noised = noise_latents(family.objective, scheduler, latents, cfg.train)
        if self.prompt_cache is not None:
            conditioning = self.prompt_cache.conditioning(batch, latents.device)
        else:
            encoders = {
                name: self.prepared(name) if name in self.components else getattr(self.pipe, name)
                for name in family.text_encoders
            }
            with torch.set_grad_enabled(cfg.boft.train_text_encoder):
                conditioning = family.encode_prompt(encoders, batch, latents.device)
        pred = family.denoise(
            self.prepared(family.denoiser),
            noised.noisy,
            noised.timesteps,
            conditioning,
            cfg.train.guidance_scale,
        )
        target, weights = noised.target, noised.weights
        spatial = None
        if "loss_mask" in batch:  # 1 inside the mask, unmasked_loss_weight outside, at the latents' size
            mask = batch["loss_mask"].to(pred.device, torch.float32)
            mask = mask + cfg.data.unmasked_loss_weight * (1.0 - mask)
            spatial = torch.nn.functional.interpolate(mask, size=pred.shape[-2:], mode="area")
        if not cfg.data.with_prior_preservation:
            return diffusion_loss(pred, target, weights, spatial)
        n = pred.shape[0] // 2
        w_inst, w_class = (None, None) if weights is None else (weights[:n], weights[n:])
        prior = diffusion_loss(pred[n:], target[n:], w_class)
        inst = diffusion_loss(pred[:n], target[:n], w_inst, None if spatial is None else spatial[:n])
        return inst + cfg.data.prior_loss_weight * prior

    # --- save ------------------------------------------------------------------------------------
    def card_parts(self) -> CardParts:
        cfg, base = self.cfg, self.base_model
        prompts = list(dict.fromkeys(c.instance_prompt for c in self.concepts))
        said = ("the prompts " if len(prompts) > 1 else "the prompt ") + ", ".join(f"`{p}`" for p in prompts)
        keys = CARD_HYPERPARAMETERS
        if cfg.data.dataset_file is not None:  # the concepts' class prompts are in the file
            keys = tuple("data.dataset_file" if k == "data.class_prompt" else k for k in keys)
        return CardParts(
            title=f"BOFT DreamBooth adapter: {'; '.join(prompts)}",
            description=f"A BOFT adapter for `{base}` trained with DreamBooth on {said} for {self.step} steps "
            "with boft-diffusion.",
            hyperparameters=keys,
            usage=_usage(cfg, prompts[0]),
            tags=("boft", "dreambooth", "diffusers", "text-to-image", "stable-diffusion"),
            instance_prompt=prompts[0],
        )

    def save_outputs(self, grid: Path | None) -> None:
        """The merged export, if asked."""
        cfg, out = self.cfg, Path(self.cfg.train.output_dir)
        if cfg.train.export_merged:
            from ..export import export_merged

            if is_sharded(self.accelerator):  # the denoiser is split across processes: merge a whole copy
                pipe = load_pipeline(cfg.model)
                load_boft_weights(pipe, out)
                export_merged(pipe, out / "merged")
                return
            with self.text_encoders_on_device():
                export_merged(self.pipe, out / "merged")


def _usage(cfg: DreamBoothConfig, prompt: str | None = None) -> str:
    """The model card's snippet: load the base and the adapter, sample ``prompt`` (default: data.instance_prompt)."""
    prompt = prompt or cfg.data.instance_prompt
    base = cfg.model.pretrained_model_name_or_path
    if base:
        imports, load = (
            "from diffusers import StableDiffusionPipeline",
            f'StableDiffusionPipeline.from_pretrained("{base}")',
        )
    else:
        family = get_family(cfg.model.tiny_family)
        seed, weights = cfg.model.tiny_seed, cfg.model.tiny_pipeline_weights
        if weights != family.tiny_weights[0]:  # not the family's default
            arguments = f'seed={seed}, weights="{weights}"'
        else:
            arguments = "" if weights == "world" else f"seed={seed}"  # the world weights need no seed
        build = family.tiny_builder
        imports, load = f"from boft_diffusion.tiny import {build}", f"{build}({arguments})"
    return f"""
{imports}
from boft_diffusion.io import load_boft_weights
from boft_diffusion.pipeline import merge_boft

pipe = {load}
load_boft_weights(pipe, "{cfg.train.output_dir}")
merge_boft(pipe)  # optional: fold the rotations into the weights for base-model speed
image = pipe("{prompt}").images[0]
"""


def run(cfg: DreamBoothConfig, on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train a DreamBooth BOFT adapter as ``cfg`` says; ``on_step(step, logs)`` runs after each step.

    Every check (config, data, model, resume, device, folders, sizes) runs before anything is
    written; everything written into output_dir is recorded in its manifest.
    """
    return DreamBoothRecipe(cfg).run(on_step)
