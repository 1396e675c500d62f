#!/usr/bin/env python
"""Controllable generation with BOFT; the same as ``boft-diffusion train controlnet``.

    python scripts/train_controlnet.py --config configs/controlnet/tiny_light.yaml [section.key=value ...]
    accelerate launch scripts/train_controlnet.py --config configs/controlnet/sd15_canny_light.yaml

The recipe itself is boft_diffusion/recipes/controlnet.py.
"""

import sys

from boft_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "controlnet", *sys.argv[1:]]))
