#!/usr/bin/env python
"""BOFT vs PEFT's LoRA, BOFT and OFT vs the floor: step time, memory, inference, merge, each ratio
with its spread over rounds; the same as ``boft-diffusion bench`` (the benchmark itself is
boft_diffusion/benchmark.py; scripts/gpu_benchmark.py is the prepared GPU run).

    python scripts/benchmark.py --preset sd15 --rounds 3 --json bench-sd15.json
    python scripts/benchmark.py --preset sd15 --latent-size 64     # 512 px
    python scripts/benchmark.py --preset sd15 --profile            # one layer, by cost category
"""

import sys

from boft_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
