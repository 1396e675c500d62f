#!/usr/bin/env python
"""Cayley transform micro-benchmark: ``block_rotations`` forward + backward, as the training step runs it.

    python scripts/bench_cayley.py            # the shapes training uses (b <= 64), about a minute
    python scripts/bench_cayley.py --large    # and the large blocks of issue #29, a few minutes

Per shape ``(m, r, b)``: packed generators ``(m, r, b(b-1)/2)`` that require a gradient, then
``block_rotations`` (the custom autograd function :class:`~boft_diffusion.functional._PackedCayley`:
the solve forward, the closed-form backward) and ``backward`` with a random gradient. Two versions
run in alternation, repeat by repeat, so that machine noise hits both alike: "current" (this
checkout) and "batched" (``functional._solve`` replaced by one batched ``torch.linalg.solve_ex``, the
code before issue #29). Each time is the minimum over ``--repeats`` of the mean over ``--number``
calls (min-of-repeats: noise only adds).
``torch.set_num_threads`` is left alone unless ``--threads`` is given: in torch 2.13 + oneMKL calling it
breaks the batched CPU solve of blocks of 150 or more (issue #29), which the old code used.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from boft_diffusion import functional
from boft_diffusion.functional import block_rotations, num_free_entries

TRAINING_SHAPES = [
    (2, 40, 8), (2, 20, 16), (2, 10, 32), (2, 5, 64),  # (2 r blocks, b = 8 / 16 / 32 / 64), d = 320
    (1, 40, 8), (1, 80, 8), (1, 160, 8),  # SD-1.5 widths 320 / 640 / 1280 with block size 8
    (2, 80, 8), (2, 160, 8),  # and m = 2 (320: above)
    (1, 4, 4), (2, 160, 4), (1, 20, 64),
]  # fmt: skip
"""``(m, r, b)`` as the training recipes use them."""

LARGE_SHAPES = [
    (1, 4, 80), (1, 4, 160), (1, 4, 320),  # SD-1.5 widths 320 / 640 / 1280 with block number 4
    (2, 4, 160), (1, 2, 640), (1, 4, 720),  # m = 2; block number 2; a 3x3 conv of 320 channels
]  # fmt: skip
"""``(m, r, b)`` with blocks above :data:`~boft_diffusion.functional.MAX_BATCHED_CPU_SOLVE` (issue #29)."""


def _batched_solve(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve_ex(lhs, rhs)[0]


def time_shape(m: int, r: int, b: int, number: int, repeats: int, baseline: bool = True) -> dict[str, float]:
    """Seconds per ``block_rotations`` forward + backward of ``(m, r, b)`` blocks, per version
    (min over repeats, the versions alternating); ``baseline=False`` times "current" only."""
    g = torch.Generator().manual_seed(0)
    packed = (torch.randn(m, r, num_free_entries(b), generator=g) * 0.1).requires_grad_()
    grad = torch.randn(m, r, b, b, generator=g)

    def step() -> None:
        block_rotations(packed, b).backward(grad)
        packed.grad = None

    versions = {"current": functional._solve, "batched": _batched_solve}
    if not baseline:
        del versions["batched"]
    best = dict.fromkeys(versions, float("inf"))
    for repeat in range(repeats + 1):
        for name, solve in list(versions.items())[:: 1 if repeat % 2 else -1]:  # alternate who goes first
            with mock.patch.object(functional, "_solve", solve):
                start = time.perf_counter()
                for _ in range(number):
                    step()
                if repeat:  # the first round warms caches and the allocator up
                    best[name] = min(best[name], (time.perf_counter() - start) / number)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--large", action="store_true", help="also time the large blocks of issue #29")
    parser.add_argument("--number", type=int, default=20, help="calls per repeat")
    parser.add_argument("--repeats", type=int, default=15, help="repeats; the minimum is reported")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="call torch.set_num_threads first (then the batched baseline, which would fail or hang, is "
        "skipped for blocks above MAX_BATCHED_CPU_SOLVE)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {functional.__file__}")
    shapes = TRAINING_SHAPES + (LARGE_SHAPES if args.large else [])
    for m, r, b in shapes:
        number = max(1, args.number // max(1, (b // 64) ** 2))
        baseline = args.threads is None or b <= functional.MAX_BATCHED_CPU_SOLVE
        best = time_shape(m, r, b, number, args.repeats, baseline)
        line = f"m={m} r={r:4d} b={b:4d}  current {best['current'] * 1e6:10.1f} us"
        if baseline:
            line += f"  batched {best['batched'] * 1e6:10.1f} us  current/batched {best['current'] / best['batched']:.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
