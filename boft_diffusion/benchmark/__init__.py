"""Benchmark: BOFT against PEFT's LoRA, BOFT and OFT (and LyCORIS' BOFT), and against the floor.

    python scripts/benchmark.py --preset sd15 --json bench-sd15.json    # about 10-15 min on 2 CPU cores
    python scripts/benchmark.py --preset sd15 --latent-size 64          # 512-px latents (4096 tokens)
    python scripts/benchmark.py --preset sdxl --json bench-sdxl.json    # SDXL-shaped UNet, full width
    python scripts/benchmark.py --preset flux --json bench-flux.json    # Flux-shaped transformer slice
    python scripts/benchmark.py --preset tiny                           # under a minute
    python scripts/benchmark.py --preset sd15 --profile                 # one layer, by cost category
    python scripts/benchmark.py --memory --preset tiny                  # peak memory per configuration
    boft-diffusion bench --preset sd15                                  # same, through the CLI

For one model preset (an SD-1.5-, SDXL- or Flux-shaped model with random weights, or the tiny UNet;
see :data:`PRESETS`; ``--latent-size`` overrides its latent side, and so its token count) each
method runs in its own worker process (``python -m boft_diffusion.benchmark --worker ...``), so its
peak memory is its own; ``--rounds`` interleave the methods round-robin (alternating the order) so
that machine noise hits every method alike. Per method a worker measures:

- training step time, the step of the training recipes: forward under the recipe's autocast (bf16
  on CUDA, none on the CPU) on noisy latents that do *not* require a gradient (they are inputs, not
  parameters), MSE against a random target in float32, backward, AdamW step on the adapter's
  parameters (base frozen), ``zero_grad(set_to_none=True)``;
- the floor step, timed in alternation with it in the same worker (paired, so the ratio cancels
  drifts in machine speed between workers). **The floor is the cheapest step any adapter of the
  same layers could have**: the adapter is switched off and every adapted layer's output instead
  goes through a zero-cost tap, an identity autograd node tied to a trainable scalar (no
  arithmetic; its gradient is not even formed). Autograd therefore runs the same backward an
  adapter forces (activation gradients from the loss down to the earliest adapted layer, never
  the frozen weights' gradients, nothing below that layer), and the optimizer step updates nothing.
  What a method costs above the floor is what its own parameters cost; the ``floor`` method runs
  the tapped step on both sides (its "× floor" shows the noise of the pairing);
- peak memory of the training phase (``ru_maxrss`` of the worker; ``max_memory_allocated`` on CUDA);
- unmerged inference (one model forward, adapters live) and merged inference (adapters folded in),
  each paired with a base forward (adapter off);
- merge time of every adapter: the model's, plus a CLIP text encoder's where the preset has one;
- trainable parameter count (of the model's adapter).

Every ratio (step × floor, step × LoRA, memory × LoRA, forward × base) is reported as its median
with its spread: per round, the median of that worker's paired ratios (against LoRA: divided by
LoRA's of the same round); the table shows the median over rounds and, in parentheses, the lowest
and highest round (with a single round: the lowest and highest paired repeat). The column
"≤ bar" says whether the step × LoRA is under ``--bar`` for the whole spread (``yes``), above it
for the whole spread (``no``) or straddles it (``unclear``): a claim is made only where the spread
allows it.

``--memory`` instead measures the peak memory of a training step per configuration (the floor, LoRA, BOFT,
and BOFT with gradient checkpointing, bitsandbytes' 8-bit AdamW, a torchao or quanto int8 base, all savers at
once), each in its own worker, with the memory after building the model so that the table shows what
training adds: see :mod:`.memory`. On 2 CPU cores ``--preset tiny`` takes under 2 minutes, ``sd15`` about 3.

``--profile`` instead profiles one adapted attention projection of the preset's width and token
count (forward and backward of BOFT b=8, m=2 and LoRA r=8) with ``torch.profiler`` and prints its
time by category (Cayley solve, permutation, block product, layout copies, base matmul, autograd
overhead, other): see :func:`profile_layer`.

What differs between model shapes (which class, how its inputs are made and how it is called, which
layers are adapted) is one :class:`ModelShape` each; the measurements are the same code for all. (Not a
model family of :mod:`boft_diffusion.families`: the benchmark builds bare denoisers, no pipelines.)

The package: :mod:`.presets`, :mod:`.models`, :mod:`.adapters`, :mod:`.measure`, :mod:`.memory`,
:mod:`.runner`, :mod:`.report` and :mod:`.profile`; the command line is ``boft-diffusion bench``.
"""

from __future__ import annotations

from .adapters import (
    Adapter,
    FloorTaps,
    lora_rank_for,
    lora_width,
)
from .measure import (
    Clock,
    measure,
    peak_memory_bytes,
    time_training,
    training_step,
)
from .memory import (
    MEMORY_CONFIGURATIONS,
    MEMORY_STEPS,
    MemoryConfiguration,
    format_memory_table,
    measure_memory,
    memory_rows,
    quantizer,
)
from .models import (
    MODEL_SHAPES,
    ModelInputs,
    ModelShape,
    build_model,
    make_inputs,
    present_targets,
    with_overrides,
)
from .presets import (
    METHODS,
    PRESETS,
    SD15_UNET,
    Method,
    Preset,
    unavailable_methods,
)
from .profile import (
    PROFILE_CATEGORIES,
    format_profile,
    profile_category,
    profile_layer,
)
from .report import (
    DEFAULT_BAR,
    format_report,
    format_table,
    ratio_spread,
    summarize,
    verdict,
)
from .runner import (
    available_cores,
    benchmark_report,
    main,
    memory_report,
    run_benchmark,
)

__all__ = [
    "MEMORY_CONFIGURATIONS",
    "MEMORY_STEPS",
    "MemoryConfiguration",
    "format_memory_table",
    "measure_memory",
    "memory_report",
    "memory_rows",
    "quantizer",
    "SD15_UNET",
    "unavailable_methods",
    "available_cores",
    "Adapter",
    "Clock",
    "peak_memory_bytes",
    "time_training",
    "present_targets",
    "profile_category",
    "DEFAULT_BAR",
    "METHODS",
    "MODEL_SHAPES",
    "ModelShape",
    "PRESETS",
    "PROFILE_CATEGORIES",
    "FloorTaps",
    "Method",
    "ModelInputs",
    "Preset",
    "benchmark_report",
    "build_model",
    "format_profile",
    "format_report",
    "format_table",
    "lora_rank_for",
    "lora_width",
    "main",
    "make_inputs",
    "measure",
    "profile_layer",
    "ratio_spread",
    "run_benchmark",
    "summarize",
    "training_step",
    "verdict",
    "with_overrides",
]
