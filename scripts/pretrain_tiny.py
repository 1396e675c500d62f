"""Pretrain the embedded tiny pipeline on the procedural world; writes the weights the package ships.

    python scripts/pretrain_tiny.py                       # about two hours on two CPU cores, seed 0
    python scripts/pretrain_tiny.py --out /tmp/w.safetensors --vae-steps 50 --unet-steps 50   # smoke run
    python scripts/pretrain_tiny.py --report-only boft_diffusion/weights/tiny_world.safetensors

Five stages, all seeded from ``--seed`` (on one torch build and thread count two runs agree up to float
rounding order; a test checks a short run):

1. VAE. ``AutoencoderKL`` (the tiny architecture of :mod:`boft_diffusion.tiny`) learns to reconstruct
   world scenes, half of them with the object in unnamed colours (random RGB, solid or in two-colour
   bands: ``VAE_PAINTS``), so that like a real model's VAE it encodes colours the captions never name
   (the DreamBooth subject's pink and teal among them; the script logs how well it reconstructs the
   subject, which it never sees). L1 + MSE on 32 × 32 crops (the VAE is convolutional; crops cost a quarter of a scene),
   a tiny KL weight; then rounded to float16, as stored (so ``--vae-from`` a file of it replays the rest).
   Its latent scaling factor is measured on the training scenes (as SD's 0.18215).
2. Latents. ``--scenes`` scenes of the pretraining world (every colour–shape pair except
   ``HELD_OUT_PAIRS``; never the DreamBooth subject) are rendered and encoded once.
3. Denoiser. UNet and CLIP text encoder learn together from scratch: epsilon prediction under SD's
   noise schedule, Min-SNR-5 weighting, AdamW with warmup and cosine decay, an EMA of the weights.
   Captions are the world's own with attributes dropped at random (``world.caption_variant``):
   "a photo of a red star", "a photo of a toy on a blue background", ... and 10 % empty prompts so
   classifier-free guidance works. A quarter of the objects wear unnamed colours (``DENOISER_PAINTS``)
   and their captions say no colour. "toy" stands for any object: the class noun of DreamBooth.
   The EMA weights are then stored (float16) and read back.
4. Decoder. With the encoder frozen (the UNet's latents stay valid), the decoder is sharpened on
   posterior samples with L1 + MSE + an edge (image-gradient) loss, as SD's ft-MSE VAE was.
   ``--stage4-from`` a file stage 3 wrote replays just this stage.
5. Rare names. UNet and text encoder continue (a second cosine cycle, fresh EMA) on the same world,
   where now some objects are *named*: the caption calls the object by a rare word of ``RARE_NAMES``
   ("a photo of sks toy on a blue background", "a photo of frog large star"), drawn at random for
   each image, and the object wears unnamed colours drawn at random too. So every rare word, the
   quickstart's identifier ``sks`` among them, gets a trained embedding that moves the conditioning
   as far as a colour word does, yet none is bound to a look: a name says "this particular toy", as a
   rare token does in a real model, and DreamBooth gives it its look. ``--stage5-from`` a file stage 4
   wrote replays just this stage.

Every stage saves its progress (``--state``, by default ``outputs/pretrain_tiny_state``) every
``--save-every`` minutes and when it ends; run the same command again after a stop and it continues
where it stopped (a finished stage is read back, a stage in progress resumes at its last save with its
optimizer, EMA, schedules and random generators). Other settings than the saved ones are refused.

The EMA weights of stage 5 are stored as float16 safetensors (keys ``unet.*``, ``vae.*``, ``text_encoder.*``,
the run's settings in the metadata), written atomically. Finally the script samples world prompts,
in-distribution and held-out pairs, with the stored weights and prints how often the world scorer
reads each attribute back (``boft_diffusion.metrics.world_prompt_accuracy``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from boft_diffusion import quiet  # noqa: F401  # isort: skip  (first: drops known import-time noise)
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel, compute_snr

from boft_diffusion import tiny
from boft_diffusion.atomic import atomic_file
from boft_diffusion.world import (
    CAPTION_DROP,
    COLOURS,
    caption_variant,
    partial_caption,
    render,
    sample_scenes,
    subject_scenes,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def images_tensor(scenes, size: int = tiny.TINY_RESOLUTION, paints=None) -> torch.Tensor:
    """Scenes (each with its ``paint`` or None) as a float (B, 3, H, W) batch in [-1, 1]."""
    paints = paints if paints is not None else [None] * len(scenes)
    batch = np.stack([render(scene, size, paint=paint)[0] for scene, paint in zip(scenes, paints)])
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def unnamed_paints(scenes, seed: int, solid: float, banded: float) -> list:
    """Per scene, None (its named colour) or unnamed colours: one random RGB with chance ``solid``, two
    random RGBs in bands with chance ``banded``. Each is kept clearly apart from the background's
    colour, so the object stays visible. The world's eight names cover a sliver of colour space;
    these teach the VAE and the denoiser the rest of it, as a real model's training data would."""
    rng = np.random.default_rng(seed)
    paints = []
    for scene in scenes:
        draw = rng.random()
        count = 1 if draw < solid else 2 if draw < solid + banded else 0
        background = np.asarray(COLOURS[scene.background], dtype=np.float64)
        colours = []
        while len(colours) < count:
            rgb = rng.integers(0, 256, 3)
            if np.linalg.norm(rgb - background) > 90:
                colours.append(tuple(int(v) for v in rgb))
        paints.append(tuple(colours) or None)
    return paints


VAE_PAINTS = {"solid": 0.25, "banded": 0.25}
"""Stages 1 and 4: a quarter of the scenes in an unnamed solid colour, a quarter in unnamed bands."""
DENOISER_PAINTS = {"solid": 0.15, "banded": 0.10}
"""Stage 3: unnamed colours are captioned without a colour word ("a photo of a large star on ...")."""


@torch.no_grad()
def check_subject_reconstruction(vae, views: int = 16) -> None:
    """Log how well the VAE reconstructs the DreamBooth subject, which no stage ever shows it: per view
    of the quickstart's instance images, and over ``views`` more. This is the ceiling of DreamBooth's
    subject fidelity on this model, since every sample passes through this decoder."""
    from boft_diffusion.metrics import reconstruction_fidelity

    images = images_tensor(subject_scenes(views, seed=123))
    recon = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    error = (recon - images).abs().mean().item() * 127.5
    likeness = reconstruction_fidelity(vae, tiny.subject_views(views, seed=123))
    log(
        f"VAE on {views} unseen subject views: mean abs error {error:.1f}/255, "
        f"subject likeness {np.mean(likeness):.2f} (lowest {min(likeness):.2f})"
    )
    default = reconstruction_fidelity(vae, tiny.subject_views())
    scenes = subject_scenes(len(default), seed=0)
    per_view = ", ".join(
        f"toy_{i:02d} ({scene.background}) {value:.2f}"
        for i, (scene, value) in enumerate(zip(scenes, default))
    )
    log(f"subject fidelity ceiling per default instance view (its VAE reconstruction): {per_view}")


def cosine_lr(optimizer, total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Progress:
    """Where a run stands, in ``folder``: each finished stage's weights, and the loop state of the stage
    in progress, saved every ``every_minutes`` (atomically, so a kill at any moment leaves the last save).

    The folder records the run's settings; another run's settings are refused, so a resumed run is the
    run that stopped, and a folder that holds files but no settings is refused too: the loop states this
    class loads and removes are only ever its own.
    """

    def __init__(self, folder: Path, settings: dict, every_minutes: float) -> None:
        self.folder, self.every = folder, every_minutes * 60
        self.last = time.time()
        recorded = folder / "settings.json"
        if recorded.is_file():
            saved = json.loads(recorded.read_text())
            if saved != settings:
                changed = sorted(k for k in {*saved, *settings} if saved.get(k) != settings.get(k))
                sys.exit(
                    f"error: --state {folder} holds a run with other settings ({', '.join(changed)} differ); "
                    "give another --state folder, or remove this one to start over"
                )
            log(f"continuing the run saved in {folder}")
        # not a folder this script started: read and remove nothing in it
        elif folder.is_dir() and any(folder.iterdir()):
            sys.exit(
                f"error: --state {folder} holds files but no settings.json, so it is not a run of this script; "
                "give an empty or new folder"
            )
        else:
            with atomic_file(recorded) as tmp:
                tmp.write_text(json.dumps(settings, indent=1))

    def finished(self, stage: str) -> Path | None:
        path = self.folder / f"{stage}.safetensors"
        return path if path.is_file() else None

    def finish(self, stage: str, pipe, metadata: dict | None = None) -> Path:
        """Store the stage's result (float16, as shipped) and drop its loop state."""
        path = tiny.save_world_weights(pipe, self.folder / f"{stage}.safetensors", metadata=metadata)
        (self.folder / f"{stage}.loop.pt").unlink(missing_ok=True)
        return path

    def resume(self, stage: str) -> dict | None:
        path = self.folder / f"{stage}.loop.pt"
        if not path.is_file():
            return None
        state = torch.load(path, weights_only=True)  # tensors and plain values only: loading runs no code
        log(f"{stage}: resuming at step {state['step']}")
        return state

    def tick(self, stage: str, step: int, state) -> None:
        """Save ``state()`` (with ``step`` steps done) when ``every_minutes`` have passed since the last save."""
        if time.time() - self.last < self.every:
            return
        with atomic_file(self.folder / f"{stage}.loop.pt") as tmp:
            torch.save({"step": step, **state()}, tmp)
        self.last = time.time()


def loop_state(modules: dict, optimizer, scheduler, generator, **extra):
    """What a training loop needs to continue exactly: a callable for :meth:`Progress.tick`."""

    def state() -> dict:
        return {
            "modules": {name: module.state_dict() for name, module in modules.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
            **{name: value() for name, value in extra.items()},
        }

    return state


def restore(saved: dict | None, modules: dict, optimizer, scheduler, generator) -> int:
    """Load a :meth:`Progress.resume` state into a loop's objects; the step to continue from."""
    if saved is None:
        return 0
    for name, module in modules.items():
        module.load_state_dict(saved["modules"][name])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    generator.set_state(saved["generator"])
    return saved["step"]


def paint_batch(batch: int, seed: int):
    """A stage-1/4 batch: world scenes, half of them in unnamed colours (``VAE_PAINTS``)."""
    scenes = sample_scenes(batch, seed=seed)
    return images_tensor(scenes, paints=unnamed_paints(scenes, seed, **VAE_PAINTS))


def train_vae(vae, steps: int, batch: int, seed: int, progress: Progress) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    scheduler = cosine_lr(optimizer, steps, warmup=50)
    modules = {"vae": vae}
    start = restore(progress.resume("vae"), modules, optimizer, scheduler, generator)
    state = loop_state(modules, optimizer, scheduler, generator)
    vae.train()
    running = 0.0
    for step in range(start, steps):
        images = paint_batch(batch, seed * 1_000_003 + step)
        y0, x0 = torch.randint(0, 33, (2,), generator=generator).tolist()
        crops = images[:, :, y0 : y0 + 32, x0 : x0 + 32]
        posterior = vae.encode(crops).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        loss = F.l1_loss(recon, crops) + F.mse_loss(recon, crops) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running += loss.item()
        if (step + 1) % 50 == 0:
            log(f"vae step {step + 1}/{steps} loss {running / 50:.4f}")
            running = 0.0
        progress.tick("vae", step + 1, state)
    vae.eval()


def finetune_decoder(vae, steps: int, batch: int, seed: int, progress: Progress) -> None:
    """Stage 4: sharpen the decoder with the encoder frozen, so the latents the UNet learned stay valid.

    Like SD's ft-MSE VAE: the decoder alone learns from posterior samples of full scenes, here on
    random 8 × 8 latent crops (32 × 32 pixels) with L1 + MSE + an L1 loss on image gradients (edges).
    """
    generator = torch.Generator().manual_seed(seed + 3)
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    optimizer = torch.optim.AdamW(decoder, lr=5e-4, weight_decay=0.0)
    scheduler = cosine_lr(optimizer, steps, warmup=50)
    modules = {"vae": vae}
    start = restore(progress.resume("decoder"), modules, optimizer, scheduler, generator)
    state = loop_state(modules, optimizer, scheduler, generator)
    vae.decoder.train()
    running = 0.0

    def gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]

    for step in range(start, steps):
        images = paint_batch(batch, (seed + 3) * 1_000_003 + step)
        with torch.no_grad():
            posterior = vae.encode(images).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        y0, x0 = torch.randint(0, 9, (2,), generator=generator).tolist()
        target = images[:, :, 4 * y0 : 4 * y0 + 32, 4 * x0 : 4 * x0 + 32]
        recon = vae.decode(latents[:, :, y0 : y0 + 8, x0 : x0 + 8]).sample
        edges = sum(F.l1_loss(a, b) for a, b in zip(gradients(recon), gradients(target)))
        loss = F.l1_loss(recon, target) + F.mse_loss(recon, target) + edges
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder, 1.0)
        optimizer.step()
        scheduler.step()
        running += loss.item()
        if (step + 1) % 50 == 0:
            log(f"decoder step {step + 1}/{steps} loss {running / 50:.4f}")
            running = 0.0
        progress.tick("decoder", step + 1, state)
    vae.eval()


@torch.no_grad()
def encode_scenes(vae, scenes, paints, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds of every scene (painted as ``paints`` says), float32 (N, 4, h, w) each."""
    means, stds = [], []
    for start in range(0, len(scenes), batch):
        chunk = slice(start, start + batch)
        posterior = vae.encode(images_tensor(scenes[chunk], paints=paints[chunk])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def caption(scene, paint, rng: np.random.Generator) -> str:
    """Pretraining's caption: ``caption_variant``, never naming the colour of an unnamed paint."""
    if paint is None:
        return caption_variant(scene, rng)
    if rng.random() < CAPTION_DROP["all"]:
        return ""
    keep = {name: bool(rng.random() >= CAPTION_DROP[name]) for name in ("size", "shape", "background")}
    return partial_caption(scene, colour=False, **keep)


RARE_NAMES: tuple[str, ...] = (
    "sks", "frog", "robot", "bird", "boat", "bear", "castle", "house",
    "flower", "ball", "box", "bike", "hat", "car", "cat", "dog",
)  # fmt: skip
"""Stage 5's rare words: one-token words of the tiny tokenizer that the world's own captions never use
(``sks``, the quickstart's identifier, first). Each names a random object in random unnamed colours, so
none is bound to a look. ``pink`` is a token too but left out: it describes the subject."""
NAMES_PAINTS = {"solid": 0.2, "banded": 0.2}
"""Stage 5: unnamed colours on two objects in five, half of them called by a rare name."""
NAMED_SHARE = 0.5


def named_caption(scene, name: str, rng: np.random.Generator) -> str:
    """The caption of an object in unnamed colours (no colour said), called ``name`` instead of "a":
    "a photo of sks toy", "a photo of sks large star on a blue background"."""
    keep = {attr: bool(rng.random() >= CAPTION_DROP[attr]) for attr in ("size", "shape", "background")}
    words = partial_caption(scene, colour=False, **keep).split(" ")
    return " ".join([*words[:3], name, *words[4:]])


def stage_captions(scenes, paints, named: bool, seed: int) -> list:
    """Per scene, None (a fresh caption each time it is drawn) or the rare name its captions use (stage 5:
    ``NAMED_SHARE`` of the objects in unnamed colours, the name drawn at random for each)."""
    if not named:
        return [None] * len(scenes)
    rng = np.random.default_rng(seed)
    return [
        RARE_NAMES[rng.integers(len(RARE_NAMES))]
        if paint is not None and rng.random() < NAMED_SHARE
        else None
        for paint in paints
    ]


def train_denoiser(pipe, data, scaling: float, args, stage: str, progress: Progress) -> None:
    """Stage 3 (``stage="denoiser"``, world captions) or stage 5 (``"names"``, some objects named):
    epsilon prediction, Min-SNR-5, AdamW + warmup + cosine, EMA; the EMA weights end in the pipeline."""
    scenes, paints, names, means, stds = data
    steps, lr, salt = (
        (args.unet_steps, args.lr, 1) if stage == "denoiser" else (args.name_steps, args.name_lr, 5)
    )
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    scheduler = cosine_lr(optimizer, steps, warmup=200)
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, power=3 / 4)
    generator = torch.Generator().manual_seed(args.seed + salt)
    rng = np.random.default_rng(args.seed + salt + 1)
    modules = {"unet": unet, "text_encoder": text_encoder}
    saved = progress.resume(stage)
    start = restore(saved, modules, optimizer, scheduler, generator)
    if saved is not None:
        ema.load_state_dict(saved["ema"])
        rng.bit_generator.state = saved["rng"]
    state = loop_state(
        modules, optimizer, scheduler, generator,
        ema=ema.state_dict, rng=lambda: rng.bit_generator.state,
    )  # fmt: skip
    unet.train()
    text_encoder.train()
    running, started = 0.0, time.time()
    for step in range(start, steps):
        index = torch.randint(0, len(scenes), (args.batch,), generator=generator)
        noise_free = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        latents = noise_free * scaling
        captions = [
            caption(scenes[i], paints[i], rng)
            if names[i] is None
            else named_caption(scenes[i], names[i], rng)
            for i in index.tolist()
        ]
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (args.batch,), generator=generator
        )
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        snr = compute_snr(noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=5.0) / snr
        loss = (F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        ema.step(params)
        running += loss.item()
        if (step + 1) % 100 == 0:
            rate = (time.time() - started) / (step + 1 - start)
            log(f"{stage} step {step + 1}/{steps} loss {running / 100:.4f} ({rate:.2f} s/step)")
            running = 0.0
        if args.snapshot and (step + 1) % args.snapshot_every == 0:
            ema.store(params)
            ema.copy_to(params)
            tiny.save_world_weights(pipe, args.snapshot, metadata={"stage": stage, "step": str(step + 1)})
            ema.restore(params)
        progress.tick(stage, step + 1, state)
    ema.copy_to(params)
    unet.eval()
    text_encoder.eval()


def weights_or_exit(flag: str, load, *args, **kwargs):
    """``load(*args, **kwargs)``; weights that cannot be read (a missing file, another format or
    architecture: ``load_world_weights`` says which) end the script with one ``error:`` line, exit code 2."""
    try:
        return load(*args, **kwargs)
    except (OSError, ValueError) as error:
        print(f"error: {flag}: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=tiny.TINY_WORLD_WEIGHTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--scenes", type=int, default=20000)
    parser.add_argument("--unet-steps", type=int, default=3600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--decoder-steps", type=int, default=800)
    parser.add_argument("--name-steps", type=int, default=3000, help="stage 5's steps (0: no stage 5)")
    parser.add_argument("--name-lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--state",
        type=Path,
        default=Path("outputs/pretrain_tiny_state"),
        help="where the run saves its progress, and continues from when run again",
    )
    parser.add_argument("--save-every", type=float, default=5.0, metavar="MINUTES")
    parser.add_argument(
        "--snapshot",
        type=Path,
        default=None,
        help="also save the EMA weights here every --snapshot-every steps",
    )
    parser.add_argument("--snapshot-every", type=int, default=400)
    parser.add_argument(
        "--vae-from", type=Path, default=None, help="skip stage 1: take the VAE from these weights"
    )
    parser.add_argument(
        "--stage4-from",
        type=Path,
        default=None,
        help="run only stages 4 and 5 on these weights (what stage 3 of the same settings wrote: the same result)",
    )
    parser.add_argument(
        "--stage5-from",
        type=Path,
        default=None,
        help="run only stage 5 on these weights (what stage 4 of the same settings wrote: the same result)",
    )
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument(
        "--report-only",
        type=Path,
        default=None,
        metavar="WEIGHTS",
        help="train nothing: sample --eval-prompts world captions (seen and held-out pairs) and score them",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()

    if args.report_only is not None:
        report(weights_or_exit("--report-only", tiny.build_tiny_pipeline, weights=args.report_only), args)
        return
    settings = {
        "seed": args.seed, "vae_steps": args.vae_steps, "vae_batch": args.vae_batch,
        "scenes": args.scenes, "unet_steps": args.unet_steps, "batch": args.batch, "lr": args.lr,
        "decoder_steps": args.decoder_steps, "name_steps": args.name_steps, "name_lr": args.name_lr,
    }  # fmt: skip
    start_from = {
        "vae_from": args.vae_from, "stage4_from": args.stage4_from, "stage5_from": args.stage5_from,
    }  # fmt: skip
    progress = Progress(
        args.state,
        {**settings, **{k: str(v) for k, v in start_from.items() if v is not None}},
        args.save_every,
    )
    if args.stage5_from is not None or args.stage4_from is not None:
        flag, path = (
            ("--stage5-from", args.stage5_from) if args.stage5_from else ("--stage4-from", args.stage4_from)
        )
        log(f"stages 1-{4 if args.stage5_from else 3}: from {path}")
        pipe = weights_or_exit(flag, tiny.build_tiny_pipeline, weights=path)
        if args.stage4_from is not None:
            stage4(pipe, args, progress)
        stage5(pipe, args, settings, progress, started)
        return
    pipe = tiny.build_tiny_pipeline(seed=args.seed, weights="random")
    if (done := progress.finished("denoiser")) is not None:
        log(f"stages 1-3: done before ({done})")
        tiny.load_world_weights(pipe, done)
    else:
        stages_1_to_3(pipe, args, progress)
    stage4(pipe, args, progress)
    stage5(pipe, args, settings, progress, started)


def stage_data(vae, args, named: bool) -> tuple[tuple, float]:
    """Stage 2 for stage 3 (``named=False``) or stage 5: the scenes, their paints and names, their latents,
    and the latent scaling factor measured on them."""
    offset = 20_000 if named else 10_000
    scenes = sample_scenes(args.scenes, seed=args.seed + offset)
    paints = unnamed_paints(scenes, args.seed + offset + 1, **(NAMES_PAINTS if named else DENOISER_PAINTS))
    names = stage_captions(scenes, paints, named, args.seed + offset + 2)
    log(
        f"stage 2: encoding {args.scenes} scenes"
        + (f", {sum(n is not None for n in names)} named" if named else "")
    )
    means, stds = encode_scenes(vae, scenes, paints)
    scaling = float(1.0 / (means + stds * torch.randn_like(means)).std())
    return (scenes, paints, names, means, stds), scaling


def stages_1_to_3(pipe, args, progress: Progress) -> None:
    if args.vae_from is not None:
        weights_or_exit("--vae-from", tiny.load_world_weights, pipe, args.vae_from, components=("vae",))
        log(f"stage 1: VAE from {args.vae_from}")
    elif (done := progress.finished("vae")) is not None:
        tiny.load_world_weights(pipe, done, components=("vae",))
        log(f"stage 1: done before ({done})")
    else:
        log(f"stage 1: VAE, {args.vae_steps} steps of {args.vae_batch} crops")
        train_vae(pipe.vae, args.vae_steps, args.vae_batch, args.seed, progress)
        # As stored: --vae-from a file of this VAE gives the same run.
        tiny.load_world_weights(pipe, progress.finish("vae", pipe), components=("vae",))
        check_subject_reconstruction(pipe.vae)

    data, scaling = stage_data(pipe.vae, args, named=False)
    pipe.vae.register_to_config(scaling_factor=scaling)
    log(f"latent scaling factor {scaling:.5f}")
    log(f"stage 3: UNet + text encoder, {args.unet_steps} steps of {args.batch}")
    train_denoiser(pipe, data, scaling, args, "denoiser", progress)
    # Stored as float16 and read back, so that stage 4 starts from exactly what --stage4-from reads.
    tiny.load_world_weights(pipe, progress.finish("denoiser", pipe))


def stage4(pipe, args, progress: Progress) -> None:
    if (done := progress.finished("decoder")) is not None:
        log(f"stage 4: done before ({done})")
        tiny.load_world_weights(pipe, done)
        return
    log(f"stage 4: decoder, {args.decoder_steps} steps of {args.vae_batch}")
    finetune_decoder(pipe.vae, args.decoder_steps, args.vae_batch, args.seed, progress)
    check_subject_reconstruction(pipe.vae)
    # Stored and read back: stage 5 starts from exactly what --stage5-from reads.
    tiny.load_world_weights(pipe, progress.finish("decoder", pipe))


def stage5(pipe, args, settings: dict, progress: Progress, started: float) -> None:
    if args.name_steps:
        log(f"stage 5: rare names, {args.name_steps} steps of {args.batch}")
        data, _ = stage_data(pipe.vae, args, named=True)
        scaling = float(pipe.vae.config.scaling_factor)  # the UNet's latents keep stage 3's scale
        train_denoiser(pipe, data, scaling, args, "names", progress)
        progress.finish("names", pipe)
    tiny.save_world_weights(pipe, args.out, metadata={"pretraining": json.dumps(settings)})
    minutes = (time.time() - started) / 60
    log(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB) after {minutes:.1f} min")
    report(tiny.build_tiny_pipeline(weights=args.out), args)


DISTANCE_PROMPTS = ("a photo of sks toy", "a photo of frog toy", "a photo of a star", "a photo of a red toy")
"""What :func:`conditioning_distances` compares with the class prompt: the quickstart's instance prompt, another
rare name, a shape word and a colour word."""


@torch.no_grad()
def conditioning_distances(pipe, prompts=DISTANCE_PROMPTS, reference: str = tiny.TINY_CLASS_PROMPT) -> dict:
    """How far each prompt's text-encoder output (77 x width, the UNet's conditioning) lies from the class
    prompt's (Frobenius norm). An identifier DreamBooth can bind a look to moves it about as far as a
    colour word does; one the encoder never learned barely moves it."""

    def encode(prompt: str) -> torch.Tensor:
        ids = pipe.tokenizer(
            prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        return pipe.text_encoder(ids)[0][0]

    base = encode(reference)
    return {prompt: float((encode(prompt) - base).norm()) for prompt in prompts}


def report(learned, args) -> None:
    """How well the pipeline's VAE reconstructs the subject, and how often the world scorer reads its
    samples of world captions back as asked."""
    from boft_diffusion.metrics import world_prompt_accuracy

    check_subject_reconstruction(learned.vae, views=32)
    log(
        "text conditioning, distance from the class prompt's: "
        + ", ".join(f"{prompt!r} {value:.2f}" for prompt, value in conditioning_distances(learned).items())
    )
    for name, held_out in (("in-distribution pairs", False), ("held-out pairs", True)):
        accuracy = world_prompt_accuracy(
            learned, num_prompts=args.eval_prompts, held_out=held_out, seed=args.seed
        )
        log(f"scorer reads samples of {name}: " + ", ".join(f"{k} {v:.0%}" for k, v in accuracy.items()))


if __name__ == "__main__":
    main()
