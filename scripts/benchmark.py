"""BOFT vs LoRA vs the no-adapter floor: step time, memory, inference, merge (see boft_diffusion.benchmark).

python scripts/benchmark.py --preset sd15 --json bench-sd15.json
"""

import sys

from boft_diffusion.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
