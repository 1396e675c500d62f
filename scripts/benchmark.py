#!/usr/bin/env python
"""BOFT vs LoRA vs the no-adapter floor: step time, memory, inference, merge; the same as
``boft-diffusion bench`` (the benchmark itself is boft_diffusion/benchmark.py).

    python scripts/benchmark.py --preset sd15 --json bench-sd15.json
"""

import sys

from boft_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
