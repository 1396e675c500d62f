#!/usr/bin/env python
"""Trainable parameters of the controllable-generation recipe on the SD-1.5 shape, next to a full ControlNet's.

    python scripts/control_parameters.py [--block-num 8] [--butterfly 2]

Built on the meta device (no weights, no download): light mode (condition encoder 16-32-96-256 trained
in full + BOFT on the UNet attention), controlnet mode (BOFT on the ControlNet attention + its condition
embedding and zero convolutions trained in full), and ControlNet's own count (every parameter trains).
"""

from __future__ import annotations

import argparse

import torch

from boft_diffusion import quiet  # noqa: F401  # isort: skip  (first: drops known import-time noise)
from diffusers import ControlNetModel, UNet2DConditionModel

from boft_diffusion.benchmark import SD15_UNET
from boft_diffusion.config import BOFTConfig
from boft_diffusion.control import LightControlConfig
from boft_diffusion.inject import UNET_ATTENTION_TARGETS, plan_adapter
from boft_diffusion.recipes.controlnet import controlnet_saved_modules


def _plan_count(model: torch.nn.Module, config: BOFTConfig) -> int:
    plan = plan_adapter(model, config)
    shapes = [s for t in plan.targets.values() for s in t.shapes().values()]
    shapes += [s for params in plan.saved.values() for s in params.values()]
    return sum(int(torch.Size(s).numel()) for s in shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-num", type=int, default=8)
    parser.add_argument("--butterfly", type=int, default=2)
    args = parser.parse_args()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
        from boft_diffusion.control import LightControl

        encoder = LightControl(LightControlConfig(unet.conv_in.out_channels, 3, (16, 32, 96, 256)))
    boft = BOFTConfig(
        boft_block_size=0, boft_block_num=args.block_num, boft_n_butterfly_factor=args.butterfly,
        bias="boft_only", target_modules=list(UNET_ATTENTION_TARGETS),
    )  # fmt: skip
    unet_boft = _plan_count(unet, boft)
    light = sum(p.numel() for p in encoder.parameters())
    boft.modules_to_save = controlnet_saved_modules(controlnet)
    cn_mode = _plan_count(controlnet, boft)
    full = sum(p.numel() for p in controlnet.parameters())
    rows = [
        ("light: encoder + BOFT on the UNet attention", light + unet_boft),
        ("controlnet: BOFT on ControlNet attention + embedding + zero convs", cn_mode),
        ("controlnet + control.train_unet", cn_mode + unet_boft),
        ("a full ControlNet (every parameter trains)", full),
    ]
    print(f"SD-1.5 shape, BOFT block_num={args.block_num}, m={args.butterfly}:")
    for name, count in rows:
        print(f"  {name:<68} {count / 1e6:8.2f} M")


if __name__ == "__main__":
    main()
