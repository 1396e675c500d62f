"""Pipeline-level verbs over every adapted component of a diffusers pipeline.

Mirrors diffusers' LoRA loader verbs (``load_lora_weights``, ``fuse_lora``, ``set_adapters``, …)
for BOFT. Each verb loops over the components :func:`loadable_components` names that are present on
``pipe``: the stock ones (:data:`BOFT_LOADABLE_COMPONENTS`) and those a registered kind of trained state
brings (:func:`~boft_diffusion.trained_state.state_components`: the light control's ``control_encoder``).
``pipe`` may be a ``DiffusionPipeline``, any object with those attributes, or a ``{component: module}``
dict. Unloading and deleting an adapter also take registered trained state off
(:meth:`~boft_diffusion.trained_state.TrainedState.remove`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .config import BOFTConfig
from .inject import (
    AdapterPlan,
    adapter_configs,
    apply_adapter_plan,
    apply_merges,
    delete_adapter,
    load_adapter_state_dict,
    plan_adapter,
    plan_merges,
    remove_boft,
    set_active_adapters,
    set_enabled,
    stock_module_name,
    stock_state_dict,
    unmerge_adapters,
)
from .quantized import is_quantized
from .trained_state import state_components, trained_states

__all__ = [
    "BOFT_LOADABLE_COMPONENTS",
    "add_boft_to_pipeline",
    "apply_adapter_plans",
    "base_fingerprint",
    "same_base",
    "boft_adapters",
    "delete_boft_adapter",
    "disable_boft",
    "enable_boft",
    "loadable_components",
    "merge_boft",
    "pipeline_components",
    "set_boft_adapters",
    "unload_boft",
    "unmerge_boft",
]

BOFT_LOADABLE_COMPONENTS = (
    "unet", "text_encoder", "text_encoder_2", "controlnet", "transformer", "text_encoder_3",
)  # fmt: skip
"""The stock pipeline attributes the BOFT verbs work on."""


def loadable_components() -> tuple[str, ...]:
    """Every component name the verbs work on: the stock ones, then those registered trained state brings."""
    return BOFT_LOADABLE_COMPONENTS + tuple(
        c for c in state_components() if c not in BOFT_LOADABLE_COMPONENTS
    )


def pipeline_components(pipe: Any) -> dict[str, nn.Module]:
    """The loadable components present on ``pipe`` (attribute or mapping), in canonical order."""
    get = pipe.get if isinstance(pipe, Mapping) else lambda n: getattr(pipe, n, None)
    return {n: m for n in loadable_components() if isinstance(m := get(n), nn.Module)}


FINGERPRINT_SAMPLES = 256
"""Values sampled per tensor by :func:`base_fingerprint`."""

_FP16_MIN_NORMAL = 2.0**-14


def base_fingerprint(
    pipe: Any,
    components: Iterable[str] | None = None,
    *,
    as_dtype: torch.dtype | None = None,
    linear_weights: bool | None = None,
) -> str:
    """A cheap fingerprint of the base weights of ``pipe``: ``"sha256:"`` and 16 hex digits.

    It tells whether an adapter was trained on this base. Per component (default: every one of
    :func:`pipeline_components`, in their order) and per tensor of its stock state dict (the base
    layers' weights under the stock keys; BOFT generators, scales and biases left out, see
    :func:`~boft_diffusion.inject.stock_state_dict`) in sorted key order, it hashes the key, the
    shape and ``FINGERPRINT_SAMPLES`` values strided over the flattened tensor
    (``t.flatten()[:: max(1, n // 256)][:256]``). Each value is rounded to bfloat16 precision, and
    values below float16's smallest normal (``2**-14``) count as zero, so that one base loaded in
    float32 or bfloat16 (and one stored in float16 or bfloat16, in any dtype) gives one fingerprint on
    any device.

    A base stored in float32 and loaded in float16 rounds each weight twice (to 11 bits, then to 8)
    and lands on the other side of a bfloat16 rounding tie in about 1 value in 16: its fingerprint is
    ``base_fingerprint(pipe, as_dtype=torch.float16)`` of the float32 load, which casts each value to
    ``as_dtype`` first, as that load did.

    Attaching an adapter leaves the fingerprint as it was; merging one changes the weights, and so the
    fingerprint (so does loading trained ``modules_to_save`` copies or ``bias="all"`` biases, which are
    then the weights in effect): take it before.

    ``linear_weights=False`` leaves the weights of linear layers out (their keys and shapes still count)
    and gives ``"sha256-nolinear:"`` and 16 hex digits: what a base with quantized linear layers and the
    same base at full precision share. ``None`` (default): left out exactly when a component in scope has
    a quantized layer (:mod:`~boft_diffusion.quantized`).
    """
    names = list(pipeline_components(pipe)) if components is None else list(components)
    present = pipeline_components(pipe)
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"Pipeline has no component(s) {missing}; it has {list(present)}")
    if linear_weights is None:
        linear_weights = not any(is_quantized(m) for n in names for m in present[n].modules())
    digest = hashlib.sha256()
    for comp in names:
        state = stock_state_dict(present[comp])
        linear = {} if linear_weights else _linear_shapes(present[comp])
        for key in sorted(state):
            if linear and _in_linear_weight(key, linear):
                continue
            tensor = state[key]
            digest.update(f"{comp}.{key}:{tuple(tensor.shape)};".encode())
            digest.update(_fingerprint_sample(tensor, as_dtype).numpy().tobytes())
        for path in sorted(linear):
            digest.update(f"{comp}.{path}.weight:{linear[path]};".encode())
    return f"sha256{'' if linear_weights else '-nolinear'}:{digest.hexdigest()[:16]}"


def same_base(pipe: Any, recorded: str) -> tuple[bool, str]:
    """Whether ``recorded`` (an adapter's ``base_fingerprint``) is this pipeline's base, and this base's
    fingerprint of the same kind.

    A float32 base's float16 fingerprint counts as the same base; a ``sha256-nolinear:`` one (an adapter
    trained on a quantized base) is compared without the linear weights, so the full-precision base passes.
    """
    linear = not recorded.startswith("sha256-nolinear:")
    ours = base_fingerprint(pipe, linear_weights=linear)
    return recorded in (ours, base_fingerprint(pipe, as_dtype=torch.float16, linear_weights=linear)), ours


def _linear_shapes(module: nn.Module) -> dict[str, tuple[int, int]]:
    """``{stock path: (out, in)}`` of every linear layer in ``module`` (plain or quantized)."""
    return {
        stock_module_name(name): (m.out_features, m.in_features)
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear)
    }


def _in_linear_weight(key: str, linear: Mapping[str, tuple[int, int]]) -> bool:
    """Whether a stock state-dict key is (part of) a linear layer's weight: any key under its path but the bias."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        path = ".".join(parts[:i])
        if path in linear:
            return parts[i:] != ["bias"]
    return False


@torch.no_grad()
def _fingerprint_sample(tensor: torch.Tensor, as_dtype: torch.dtype | None) -> torch.Tensor:
    """At most ``FINGERPRINT_SAMPLES`` strided values of ``tensor``, float32 on the CPU, at bfloat16 precision."""
    flat = tensor.detach().flatten()
    sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES]
    if as_dtype is not None and sample.is_floating_point():
        sample = sample.to(as_dtype)
    sample = sample.to(device="cpu", dtype=torch.float32).to(torch.bfloat16).to(torch.float32)
    return torch.where(sample.abs() < _FP16_MIN_NORMAL, torch.zeros_like(sample), sample).contiguous()


def boft_adapters(pipe: Any) -> dict[str, list[str]]:
    """``{component: [adapter names]}`` for components that hold BOFT adapters."""
    return {c: list(adapter_configs(m)) for c, m in pipeline_components(pipe).items() if adapter_configs(m)}


def add_boft_to_pipeline(pipe: Any, configs: Mapping[str, BOFTConfig], adapter_name: str = "default") -> None:
    """Add a fresh adapter to each named component (``{"unet": cfg, "text_encoder": cfg}``).

    Every component is planned (and so checked) before any is touched: on error the pipeline is unchanged.
    """
    components = pipeline_components(pipe)
    missing = [c for c in configs if c not in components]
    if missing:
        raise ValueError(f"Pipeline has no component(s) {missing}; it has {list(components)}")
    taken = [c for c in configs if adapter_name in adapter_configs(components[c])]
    if taken:
        raise ValueError(
            f"{taken[0]} already has an adapter named {adapter_name!r}; pass another adapter_name"
        )
    plans = {comp: plan_adapter(components[comp], config, adapter_name) for comp, config in configs.items()}
    apply_adapter_plans(pipe, plans)


def apply_adapter_plans(
    pipe: Any,
    plans: Mapping[str, AdapterPlan],
    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """Add the adapter each plan describes to its component, then load ``tensors`` (``{component:
    adapter state dict}``, possibly partial) into it. All or nothing: on error every component is as before.
    """
    components = pipeline_components(pipe)
    done = []
    try:
        for comp, plan in plans.items():
            apply_adapter_plan(components[comp], plan)
            done.append(comp)
            if tensors is not None and comp in tensors:
                load_adapter_state_dict(components[comp], tensors[comp], plan.adapter_name, strict=False)
    except BaseException:
        for comp in done:
            delete_adapter(components[comp], plans[comp].adapter_name)
        raise


# --- merge, activation, removal -----------------------------------------------------------------
def merge_boft(
    pipe: Any,
    adapter_names: list[str] | None = None,
    safe_merge: bool = False,
    progressbar: bool = False,
    requantize: bool = False,
) -> None:
    """Fold adapters (default: the active ones) into the weights and biases for base-speed sampling.

    Every component's merged weights are computed and checked for non-finite values before any is
    written: a broken adapter raises ``ValueError`` and leaves the pipeline untouched. ``safe_merge``
    is accepted for diffusers/PEFT compatibility; the check always runs. A quantized base is refused
    unless ``requantize`` (:func:`~boft_diffusion.inject.plan_merges`; the error it adds is warned).
    """
    del safe_merge  # always on
    modules = pipeline_components(pipe).values()
    plans = [
        plan for module in modules for plan in plan_merges(module, adapter_names, progressbar, requantize)
    ]
    apply_merges(plans)


def unmerge_boft(pipe: Any) -> None:
    """Undo :func:`merge_boft` exactly (rotations are orthogonal)."""
    for module in pipeline_components(pipe).values():
        unmerge_adapters(module)


def unload_boft(pipe: Any) -> None:
    """Remove every BOFT adapter: the original module objects go back, unmerged, with their original biases;
    registered trained state that adapters brought (new tokens) is taken off too."""
    for module in pipeline_components(pipe).values():
        remove_boft(module, keep_merged=False)
    for kind in trained_states():
        kind.remove(pipe, None)


def set_boft_adapters(
    pipe: Any, adapter_names: list[str] | str, adapter_weights: float | list[float] | None = None
) -> None:
    """Activate adapters (composed in order) with strengths; ``0`` is the base model, ``1`` the adapter."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    weights = [adapter_weights] * len(names) if isinstance(adapter_weights, int | float) else adapter_weights
    known = {n for adapters in boft_adapters(pipe).values() for n in adapters}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"Unknown BOFT adapter(s) {unknown}; loaded: {sorted(known)}")
    for module in pipeline_components(pipe).values():
        if adapter_configs(module):
            present = [
                (n, w) for n, w in zip(names, weights or [1.0] * len(names)) if n in adapter_configs(module)
            ]
            set_active_adapters(module, [n for n, _ in present], [w for _, w in present])


def enable_boft(pipe: Any) -> None:
    for module in pipeline_components(pipe).values():
        set_enabled(module, True)


def disable_boft(pipe: Any) -> None:
    """Sample from the base model with adapters kept loaded (merged ones are unmerged first)."""
    for module in pipeline_components(pipe).values():
        set_enabled(module, False)


def delete_boft_adapter(pipe: Any, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` from every component (diffusers' ``delete_adapters``); layers
    left with no adapter go back to the original modules, and ``bias="all"`` biases are restored."""
    for module in pipeline_components(pipe).values():
        if adapter_name in adapter_configs(module):
            delete_adapter(module, adapter_name)
    for kind in trained_states():
        kind.remove(pipe, adapter_name)
