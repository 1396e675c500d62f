"""``boft-diffusion bench``: speed and memory of BOFT against its peers and the no-adapter floor.

The benchmark itself is :mod:`boft_diffusion.benchmark` (``scripts/benchmark.py`` runs this verb).
"""

from __future__ import annotations

import argparse

from . import Command, add_example, check_new_output, reports_input_errors

HELP = "benchmark BOFT training and inference against PEFT LoRA, BOFT and OFT and the no-adapter floor"
EXAMPLE = """example:
  boft-diffusion bench --preset tiny                          # under a minute
  boft-diffusion bench --preset sd15 --json bench-sd15.json   # SD-1.5-shaped UNet, minutes on CPU
  boft-diffusion bench --preset sd15 --latent-size 64         # the same at 512 px (4096 tokens)
  boft-diffusion bench --preset sd15 --profile                # one layer's time by category"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..benchmark import add_arguments as benchmark_arguments

    benchmark_arguments(parser)
    add_example(parser, EXAMPLE)


@reports_input_errors
def run(args: argparse.Namespace) -> int:
    from ..benchmark import run as run_benchmark

    if args.json is not None:  # before minutes of measuring, not after
        check_new_output(args.json, inputs=(), overwrite=True)  # the benchmark reads no file
    return run_benchmark(args)


COMMAND = Command(HELP, add_arguments, run)
