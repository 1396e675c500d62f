"""Each method's adapter on a model (BOFT, PEFT's LoRA / BOFT / OFT, LyCORIS' BOFT), the floor's zero-cost taps and
LoRA's rank at a parameter budget."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .presets import Method


class Adapter:
    """One method's adapter on one model: add, switch on and off, merge, unmerge (no-ops for the floor)."""

    def __init__(self, method: Method, model: nn.Module, targets: list[str]) -> None:
        self.method = method
        self.model = model
        self.targets = list(targets)
        self._lycoris: Any = None
        self._lycoris_applied = False
        self._saved_weights: dict[str, torch.Tensor] = {}
        if method.kind == "boft":
            from ..config import BOFTConfig
            from ..inject import add_boft

            opts = method.options
            add_boft(
                model,
                BOFTConfig(
                    boft_block_size=opts["b"], boft_n_butterfly_factor=opts["m"], target_modules=targets
                ),
            )
        elif method.kind in ("lora", "peft-boft", "peft-oft"):
            self._add_peft(targets)
        elif method.kind == "lycoris-boft":
            self._add_lycoris(targets)

    def _add_peft(self, targets: list[str]) -> None:
        import peft

        opts = self.method.options
        if self.method.kind == "lora":
            config: Any = peft.LoraConfig(r=opts["r"], lora_alpha=opts["r"], target_modules=targets)
        elif self.method.kind == "peft-boft":
            config = peft.BOFTConfig(
                boft_block_size=opts["b"], boft_n_butterfly_factor=opts["m"], target_modules=targets
            )
        else:  # OFT v2 (PEFT >= 0.17): block size given, rank derived; Cayley-Neumann by default
            config = peft.OFTConfig(r=0, oft_block_size=opts["b"], target_modules=targets)
        with _quiet():  # PEFT warns that its CUDA extension is unavailable on CPU
            peft.inject_adapter_in_model(config, self.model)
        for name, p in self.model.named_parameters():
            p.requires_grad_(any(tag in name for tag in ("lora_", "boft_", "oft_")))

    def _add_lycoris(self, targets: list[str]) -> None:
        """LyCORIS' BOFT (``algo="boft"``, block factor ``b``) on exactly the modules ``targets`` names.

        ``create_lycoris`` would apply LyCORIS' ``full`` preset (every linear and conv of each
        transformer and resnet block), so the network is built directly after a preset naming only
        the adapted projections. LyCORIS derives its butterfly depth from the width (``log2(d / b)``
        factors), so the row is its own default configuration at that block factor.
        """
        import re

        from lycoris import LycorisNetwork

        LycorisNetwork.apply_preset(
            {
                "enable_conv": False,
                "target_module": [],
                "target_name": [".*" + re.escape("." + t) + "$" for t in targets]
                + [re.escape(t) + "$" for t in targets],
                "module_algo_map": {},
                "name_algo_map": {},
                "use_fnmatch": False,
                "exclude_name": [],
            }
        )
        with _quiet():
            net = LycorisNetwork(
                self.model,
                multiplier=1.0,
                lora_dim=self.method.options["b"],
                alpha=1.0,
                network_module="boft",
            )
        net.apply_to()
        net.requires_grad_(True)
        self._lycoris, self._lycoris_applied = net, True

    def _apply_lycoris(self, applied: bool) -> None:
        """Hook LyCORIS' modules in or out (its ``apply_to`` on hooked modules would wrap them twice)."""
        if applied != self._lycoris_applied:
            self._lycoris.apply_to() if applied else self._lycoris.restore()
            self._lycoris_applied = applied

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer steps (the model's that require grad; LyCORIS' own)."""
        if self._lycoris is not None:
            return [p for p in self._lycoris.parameters() if p.requires_grad]
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def trains(self) -> bool:
        """Whether there is an adapter to train (the floor has none)."""
        return self.method.kind != "none"

    def merge(self) -> None:
        if self.method.kind == "boft":
            from ..inject import merge_adapters

            merge_adapters(self.model)
        elif self.method.kind == "lycoris-boft":
            self._saved_weights = {k: v.clone() for k, v in self.model.state_dict().items()}
            self._apply_lycoris(False)
            self._lycoris.merge_to(1.0)
        elif self.method.kind != "none":
            for layer in self._peft_layers():
                layer.merge()

    def unmerge(self) -> None:
        if self.method.kind == "boft":
            from ..inject import unmerge_adapters

            unmerge_adapters(self.model)
        elif self.method.kind == "lycoris-boft":  # LyCORIS merges in place: restore the saved weights
            self.model.load_state_dict(self._saved_weights)
            self._saved_weights = {}
            self._apply_lycoris(True)
        elif self.method.kind != "none":
            for layer in self._peft_layers():
                layer.unmerge()

    def enable(self, enabled: bool) -> None:
        """Switch the (unmerged) adapter on or off: off is the base model."""
        if self.method.kind == "boft":
            from ..inject import set_enabled

            set_enabled(self.model, enabled)
        elif self.method.kind == "lycoris-boft":
            self._apply_lycoris(enabled)
        elif self.method.kind != "none":
            for layer in self._peft_layers():
                layer.enable_adapters(enabled)

    def _peft_layers(self) -> Iterator[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return (m for m in self.model.modules() if isinstance(m, BaseTunerLayer))


def lora_width(layer: nn.Module) -> int:
    """Parameters per unit of LoRA rank on ``layer``: ``d_in + d_out`` for a Linear; for a Conv2d, PEFT's
    ``lora_A`` is a conv of the layer's kernel (``in_channels * k_h * k_w`` per rank) and ``lora_B`` a 1 x 1
    conv (``out_channels``)."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels // layer.groups * math.prod(layer.kernel_size) + layer.out_channels
    if isinstance(layer, nn.Linear):
        return layer.in_features + layer.out_features
    raise TypeError(f"LoRA's width is defined here for Linear and Conv2d layers, not {type(layer).__name__}")


def lora_rank_for(layers: Iterable[nn.Module], budget: int) -> int:
    """The LoRA rank (at least 1) whose factors on ``layers`` hold closest to ``budget`` parameters: the
    rank that matches another adapter's trainable count in a comparison (a rank-r pair holds
    ``r * lora_width``)."""
    per_rank = sum(map(lora_width, layers))
    if per_rank == 0:
        raise ValueError("no layers to size a LoRA rank for")
    return max(1, round(budget / per_rank))


class _Tap(torch.autograd.Function):
    """Identity on a layer's output, tied to a trainable scalar: no arithmetic, one graph node.

    It makes autograd reach the layer (and so every layer between it and the loss) the way an
    adapter there would; its own gradient is never formed (``None``).
    """

    @staticmethod
    def forward(ctx, output, anchor):  # noqa: D102
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None


class FloorTaps:
    """Zero-cost taps on the adapted layers: the floor step (see the module docstring).

    One forward hook per module whose name ends with a target (the adapter's wrapper where there is
    one: switched off it is the base layer); active only while :meth:`enable`\\ d and grad is on.
    """

    def __init__(self, model: nn.Module, targets: list[str]) -> None:
        modules = [
            m
            for name, m in model.named_modules()
            if any(name == t or name.endswith("." + t) for t in targets)
        ]
        device = next(model.parameters()).device
        self.anchors = [nn.Parameter(torch.zeros((), device=device)) for _ in modules]
        self.enabled = False
        for module, anchor in zip(modules, self.anchors):
            module.register_forward_hook(self._hook(anchor))

    def _hook(self, anchor: nn.Parameter) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.enabled and torch.is_grad_enabled() and isinstance(output, torch.Tensor):
                return _Tap.apply(output, anchor)
            return None

        return hook

    def enable(self, enabled: bool) -> None:
        self.enabled = enabled


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings(), open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        warnings.simplefilter("ignore")
        yield
