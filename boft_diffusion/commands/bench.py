"""``boft-diffusion bench``: speed and memory of BOFT against LoRA and the no-adapter floor.

The benchmark itself is :mod:`boft_diffusion.benchmark` (also ``scripts/benchmark.py``).
"""

from __future__ import annotations

import argparse
import sys

from . import add_example, make_command

HELP = "benchmark BOFT training and inference against PEFT LoRA, PEFT BOFT and the no-adapter floor"
EXAMPLE = """example:
  boft-diffusion bench --preset tiny                          # under a minute
  boft-diffusion bench --preset sd15 --json bench-sd15.json   # SD-1.5-shaped UNet, minutes on CPU"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..benchmark import add_arguments as benchmark_arguments

    benchmark_arguments(parser)
    add_example(parser, EXAMPLE)


def run(args: argparse.Namespace) -> int:
    from ..benchmark import run as run_benchmark

    return run_benchmark(args)


COMMAND = make_command(HELP, add_arguments, run)

if __name__ == "__main__":
    from ..benchmark import main

    sys.exit(main())
