#!/usr/bin/env python
"""DreamBooth with BOFT; the same as ``boft-diffusion train dreambooth``.

    python scripts/train_dreambooth.py --config configs/dreambooth/tiny.yaml [section.key=value ...]
    accelerate launch scripts/train_dreambooth.py --config configs/dreambooth/sd15.yaml

The recipe itself is boft_diffusion/recipes/dreambooth.py.
"""

import sys

from boft_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "dreambooth", *sys.argv[1:]]))
