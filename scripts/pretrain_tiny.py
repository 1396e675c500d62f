"""Pretrain the embedded tiny pipeline on the procedural world; writes the weights the package ships.

    python scripts/pretrain_tiny.py                       # about an hour on two CPU cores, seed 0
    python scripts/pretrain_tiny.py --out /tmp/w.safetensors --vae-steps 50 --unet-steps 50   # smoke run
    python scripts/pretrain_tiny.py --report-only boft_diffusion/weights/tiny_world.safetensors

Four stages, all seeded from ``--seed`` (on one torch build and thread count two runs agree up to float
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

The EMA weights are stored as float16 safetensors (keys ``unet.*``, ``vae.*``, ``text_encoder.*``,
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
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel, compute_snr

from boft_diffusion import tiny
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


def paint_batch(batch: int, seed: int):
    """A stage-1/4 batch: world scenes, half of them in unnamed colours (``VAE_PAINTS``)."""
    scenes = sample_scenes(batch, seed=seed)
    return images_tensor(scenes, paints=unnamed_paints(scenes, seed, **VAE_PAINTS))


def train_vae(vae, steps: int, batch: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    scheduler = cosine_lr(optimizer, steps, warmup=50)
    vae.train()
    running = 0.0
    for step in range(steps):
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
    vae.eval()


def finetune_decoder(vae, steps: int, batch: int, seed: int) -> None:
    """Stage 4: sharpen the decoder with the encoder frozen, so the latents the UNet learned stay valid.

    Like SD's ft-MSE VAE: the decoder alone learns from posterior samples of full scenes, here on
    random 8 × 8 latent crops (32 × 32 pixels) with L1 + MSE + an L1 loss on image gradients (edges).
    """
    generator = torch.Generator().manual_seed(seed + 3)
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    optimizer = torch.optim.AdamW(decoder, lr=5e-4, weight_decay=0.0)
    scheduler = cosine_lr(optimizer, steps, warmup=50)
    vae.decoder.train()
    running = 0.0

    def gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]

    for step in range(steps):
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


def train_denoiser(pipe, scenes, paints, means, stds, scaling: float, args) -> None:
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    scheduler = cosine_lr(optimizer, args.unet_steps, warmup=200)
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, power=3 / 4)
    generator = torch.Generator().manual_seed(args.seed + 1)
    rng = np.random.default_rng(args.seed + 2)
    unet.train()
    text_encoder.train()
    running, started = 0.0, time.time()
    for step in range(args.unet_steps):
        index = torch.randint(0, len(scenes), (args.batch,), generator=generator)
        noise_free = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        latents = noise_free * scaling
        captions = [caption(scenes[i], paints[i], rng) for i in index.tolist()]
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
            rate = (time.time() - started) / (step + 1)
            log(f"unet step {step + 1}/{args.unet_steps} loss {running / 100:.4f} ({rate:.2f} s/step)")
            running = 0.0
        if args.snapshot and (step + 1) % args.snapshot_every == 0:
            ema.store(params)
            ema.copy_to(params)
            tiny.save_world_weights(pipe, args.snapshot, metadata={"step": str(step + 1)})
            ema.restore(params)
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
    parser.add_argument("--threads", type=int, default=2)
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
    parser.add_argument("--decoder-steps", type=int, default=800)
    parser.add_argument(
        "--stage4-from",
        type=Path,
        default=None,
        help="run only stage 4 on these weights (what stage 3 of the same settings wrote: the same result)",
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
    if args.stage4_from is not None:
        log(f"stages 1-3: from {args.stage4_from}")
        stage4(
            weights_or_exit("--stage4-from", tiny.build_tiny_pipeline, weights=args.stage4_from),
            args,
            started,
        )
        return
    pipe = tiny.build_tiny_pipeline(seed=args.seed, weights="random")
    if args.vae_from is not None:
        weights_or_exit("--vae-from", tiny.load_world_weights, pipe, args.vae_from, components=("vae",))
        log(f"stage 1: VAE from {args.vae_from}")
    else:
        log(f"stage 1: VAE, {args.vae_steps} steps of {args.vae_batch} crops")
        train_vae(pipe.vae, args.vae_steps, args.vae_batch, args.seed)
        for param in pipe.vae.parameters():  # as stored: --vae-from a file of this VAE gives the same run
            param.data = param.data.to(torch.float16).to(torch.float32)
        check_subject_reconstruction(pipe.vae)

    log(f"stage 2: encoding {args.scenes} scenes")
    scenes = sample_scenes(args.scenes, seed=args.seed + 10_000)
    paints = unnamed_paints(scenes, args.seed + 10_001, **DENOISER_PAINTS)
    means, stds = encode_scenes(pipe.vae, scenes, paints)
    scaling = float(1.0 / (means + stds * torch.randn_like(means)).std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    log(f"latent scaling factor {scaling:.5f}")

    log(f"stage 3: UNet + text encoder, {args.unet_steps} steps of {args.batch}")
    train_denoiser(pipe, scenes, paints, means, stds, scaling, args)
    # Stored as float16 and read back, so that stage 4 starts from exactly what --stage4-from reads.
    tiny.save_world_weights(pipe, args.out)
    tiny.load_world_weights(pipe, args.out)
    stage4(pipe, args, started)


def stage4(pipe, args, started: float) -> None:
    log(f"stage 4: decoder, {args.decoder_steps} steps of {args.vae_batch}")
    finetune_decoder(pipe.vae, args.decoder_steps, args.vae_batch, args.seed)
    check_subject_reconstruction(pipe.vae)
    settings = {
        "seed": args.seed, "vae_steps": args.vae_steps, "vae_batch": args.vae_batch,
        "scenes": args.scenes, "unet_steps": args.unet_steps, "batch": args.batch, "lr": args.lr,
        "decoder_steps": args.decoder_steps,
    }  # fmt: skip
    tiny.save_world_weights(pipe, args.out, metadata={"pretraining": json.dumps(settings)})
    minutes = (time.time() - started) / 60
    log(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB) after {minutes:.1f} min")
    report(tiny.build_tiny_pipeline(weights=args.out), args)


def report(learned, args) -> None:
    """How well the pipeline's VAE reconstructs the subject, and how often the world scorer reads its
    samples of world captions back as asked."""
    from boft_diffusion.metrics import world_prompt_accuracy

    check_subject_reconstruction(learned.vae, views=32)
    for name, held_out in (("in-distribution pairs", False), ("held-out pairs", True)):
        accuracy = world_prompt_accuracy(
            learned, num_prompts=args.eval_prompts, held_out=held_out, seed=args.seed
        )
        log(f"scorer reads samples of {name}: " + ", ".join(f"{k} {v:.0%}" for k, v in accuracy.items()))


if __name__ == "__main__":
    main()
