"""Injection: find target modules by name, swap BOFT layers in, and take them out again.

Works on any ``nn.Module`` (diffusers ``UNet2DConditionModel`` / ``ControlNetModel``, transformers
``CLIPTextModel`` / ``CLIPTextModelWithProjection``, plain modules). Layers are addressed by their
qualified module name (as in ``unet.attn_processors`` keys), which stays the same after injection;
the attention modules and their processors (SDPA, xformers, custom) are never touched.

Adapter state in both directions lives here, and only here: :func:`plan_adapter` works out what
:func:`add_boft` will create (per target its layer type, block layout and tensor shapes) without touching
the model, :func:`check_adapter_state_dict` checks a file's tensors against a plan,
:func:`adapter_state_dict` / :func:`load_adapter_state_dict` take the trained tensors out and put them
back (exact inverses), and :func:`stock_state_dict` gives a model's state dict under the stock keys.
Nothing else in the package knows how the wrappers (BOFT layers, ``modules_to_save``) lay out their keys.

Biases (``BOFTConfig.bias``): with ``"boft_only"`` each adapted layer trains the adapter's own copy of
its bias (``layer.boft_bias[name]``); the base bias is never trained or loaded into, so strength 0,
``disable``, ``unload`` and ``delete_adapter`` give the base model back exactly. With ``"all"`` the
biases of every other (not adapted) module train as well; those are the modules' own parameters (no
layer wraps them), so their original values are snapshotted when the adapter is added and put back bit
for bit by :func:`remove_boft` (``keep_merged=False``) and :func:`delete_adapter` (once no ``"all"``
adapter is left). Strength, ``disable`` and composition do not scale those un-adapted biases: they hold
the trained values while an ``"all"`` adapter is loaded.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import BlockLayout, BOFTConfig
from .functional import num_free_entries
from .layers import BOFTLayer, MergePlan, layer_class, wrap_layer
from .quantized import QuantizedMergeError

__all__ = [
    "TEXT_ENCODER_TARGETS",
    "UNET_ATTENTION_TARGETS",
    "UNET_ATTENTION_TARGETS_WITH_ADDED_KV",
    "AdapterPlan",
    "BOFTModel",
    "ModulesToSave",
    "TargetPlan",
    "adapter_configs",
    "adapter_state_dict",
    "add_boft",
    "apply_adapter_plan",
    "apply_merges",
    "biases_trained_in_place",
    "boft_layers",
    "set_rotation_cache",
    "check_adapter_state_dict",
    "default_targets",
    "find_target_names",
    "load_adapter_state_dict",
    "merge_adapters",
    "plan_adapter",
    "plan_merges",
    "remove_boft",
    "saved_modules",
    "set_active_adapters",
    "stock_module_name",
    "stock_state_dict",
    "unmerge_adapters",
]

UNET_ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_ATTENTION_TARGETS_WITH_ADDED_KV = [*UNET_ATTENTION_TARGETS, "add_k_proj", "add_v_proj"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

_CONFIGS_ATTR = "_boft_configs"
_BIAS_SNAPSHOT_ATTR = "_boft_bias_snapshot"


class ModulesToSave(nn.Module):
    """A module trained in full: the untouched original plus one trainable copy per adapter."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.original)
        self.copies[name].requires_grad_(True)
        self.active = name

    def forward(self, *args, **kwargs):
        if self.disabled or self.active not in self.copies:
            return self.original(*args, **kwargs)
        return self.copies[self.active](*args, **kwargs)


def adapter_configs(model: nn.Module) -> dict[str, BOFTConfig]:
    """The ``{adapter name: BOFTConfig}`` of a model (empty if it has no BOFT adapter)."""
    return getattr(model, _CONFIGS_ATTR, {})


def boft_layers(model: nn.Module) -> dict[str, BOFTLayer]:
    """Every BOFT layer of ``model`` by qualified module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BOFTLayer)}


def set_rotation_cache(model: nn.Module, enabled: bool) -> None:
    """Switch the reuse of rotations across sampling calls on or off for every BOFT layer of ``model``
    (on by default; see :mod:`boft_diffusion.layers`). Off, each forward pass rebuilds them; the
    recipes turn it off under FSDP, whose all-gathers do not bump parameter version counters."""
    for layer in boft_layers(model).values():
        layer.cache_rotations = enabled
        layer.clear_rotation_cache()


def _saved_modules(model: nn.Module) -> dict[str, ModulesToSave]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ModulesToSave)}


def default_targets(model: nn.Module) -> list[str]:
    """Target presets by model family: UNet/ControlNet attention, or CLIP projections."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if "to_q" in names:
        return list(UNET_ATTENTION_TARGETS)
    if "q_proj" in names:
        return list(TEXT_ENCODER_TARGETS)
    raise ValueError(
        f"No target_modules given and no preset for {type(model).__name__}; "
        "pass target_modules (name suffixes or a regex)"
    )


def _layer_index(name: str, pattern: list[str] | str | None) -> int | None:
    """The layer number in ``name`` (PEFT's rule: the index after ``layers_pattern``)."""
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if not patterns:
        found = re.match(r".*\.[^.]*\.(\d+)\.", name)
        return int(found.group(1)) if found else None
    for p in patterns:
        found = re.match(rf".*\.{re.escape(p)}\.(\d+)\.", name)
        if found:
            return int(found.group(1))
    return None


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_target_names(model: nn.Module, config: BOFTConfig) -> list[str]:
    """Qualified names of the modules ``config`` adapts (excluding ones inside BOFT layers)."""
    targets = config.target_modules if config.target_modules is not None else default_targets(model)
    if isinstance(targets, list) and not targets and config.modules_to_save:
        return []  # an adapter that only trains modules in full (e.g. a control encoder)
    keep = config.layers_to_transform
    keep = [keep] if isinstance(keep, int) else keep
    found = []
    for name, module in model.named_modules():
        if ".base_layer" in name or isinstance(module, ModulesToSave) or not _matches(name, targets):
            continue
        if keep is not None and _layer_index(name, config.layers_pattern) not in keep:
            continue
        found.append(name)
    if not found:
        raise ValueError(f"target_modules {targets!r} matched no module of {type(model).__name__}")
    return found


# --- the plan: what add_boft creates, worked out without touching the model ------------------------
Shape = tuple[int, ...]


@dataclass(frozen=True)
class TargetPlan:
    """One layer an adapter adapts: its BOFT layer type, block layout and output size.

    ``bias`` is the shape of the adapter's own bias (``None``: the config trains no bias, or the base
    layer has none).
    """

    layer_type: type[BOFTLayer]
    layout: BlockLayout
    out_features: int
    bias: Shape | None

    def shapes(self) -> dict[str, Shape]:
        """``{leaf: shape}``: ``boft_R`` ``(m, r, b(b-1)/2)``, ``boft_s`` ``(out,)``, ``bias`` ``(out,)``."""
        layout = self.layout
        shapes = {
            "boft_R": (layout.n_factors, layout.block_num, num_free_entries(layout.block_size)),
            "boft_s": (self.out_features,),
        }
        if self.bias is not None:
            shapes["bias"] = self.bias
        return shapes


@dataclass(frozen=True)
class AdapterPlan:
    """What ``add_boft(model, config, adapter_name)`` creates, computed by :func:`plan_adapter`.

    ``targets``: ``{layer path: TargetPlan}``; ``saved``: ``{modules_to_save path: {parameter: shape}}``;
    ``own_biases``: ``{state-dict key: shape}`` of the un-adapted biases ``bias="all"`` trains;
    ``other_layers``: BOFT layers of other adapters that this one does not target.
    """

    adapter_name: str
    config: BOFTConfig
    model_type: type[nn.Module]
    targets: dict[str, TargetPlan]
    saved: dict[str, dict[str, Shape]]
    own_biases: dict[str, Shape]
    other_layers: frozenset[str]

    def shapes(self) -> dict[str, Shape]:
        """Every key of :func:`adapter_state_dict` once the plan is applied, with its shape (same order)."""
        shapes = {}
        for path, target in self.targets.items():
            shapes.update(
                {f"{path}.{leaf}": shape for leaf, shape in target.shapes().items() if leaf != "bias"}
            )
        shapes.update({f"{path}.bias": t.bias for path, t in self.targets.items() if t.bias is not None})
        shapes.update(self.own_biases)
        for path, params in self.saved.items():
            shapes.update({f"{path}.{name}": shape for name, shape in params.items()})
        return shapes

    def required(self) -> list[str]:
        """Keys an adapter file must hold: every generator and scale, and the biases of ``bias="boft_only"``."""
        keys = [f"{path}.{leaf}" for path in self.targets for leaf in ("boft_R", "boft_s")]
        if self.config.bias == "boft_only":
            keys += [f"{path}.bias" for path, t in self.targets.items() if t.bias is not None]
        return keys


def plan_adapter(model: nn.Module, config: BOFTConfig, adapter_name: str = "default") -> AdapterPlan:
    """What :func:`add_boft` creates on ``model``: per target its layer type, layout and tensor shapes.

    Nothing is built or modified. Raises what :func:`add_boft` raises, naming the layer: targets or
    ``modules_to_save`` that match nothing, a target of an unsupported type, sizes that break the
    block or butterfly rules, a module both adapted and trained in full. On a model that already holds
    ``adapter_name`` (added with ``config``), the plan describes that adapter as it is.
    """
    modules = dict(model.named_modules())
    targets = {name: _plan_target(modules[name], config, name) for name in find_target_names(model, config)}
    saved_names = _find_modules_to_save(model, config)
    layers, wrappers = boft_layers(model), _saved_modules(model)
    _check_nesting([*targets, *layers], [*saved_names, *wrappers])
    saved = {
        name: {n: tuple(p.shape) for n, p in _original(modules[name]).named_parameters()}
        for name in saved_names
    }
    own = {}
    if config.bias == "all":
        wrapped = [*targets, *layers, *saved_names, *wrappers]
        own = {key: tuple(p.shape) for key, p in _unwrapped_biases(model, wrapped).items()}
    others = frozenset(name for name in layers if name not in targets)
    return AdapterPlan(adapter_name, config, type(model), targets, saved, own, others)


def _plan_target(module: nn.Module, config: BOFTConfig, name: str) -> TargetPlan:
    if isinstance(module, BOFTLayer):  # adapted by another adapter already
        layer_type, base, bias = type(module), module.base_layer, module.original_bias()
    else:
        layer_type, base, bias = layer_class(module, name), module, module.bias
    dim, out = layer_type.shape_of(base)
    layout = config.resolve_blocks(dim, name)  # raises with the layer's name
    trains_bias = config.bias != "none" and bias is not None
    return TargetPlan(layer_type, layout, out, tuple(bias.shape) if trains_bias else None)


def _original(module: nn.Module) -> nn.Module:
    return module.original if isinstance(module, ModulesToSave) else module


def _check_nesting(adapted: list[str], full: list[str]) -> None:
    """A module is either adapted or trained in full (``modules_to_save``), and full ones do not nest."""
    for outer in dict.fromkeys(full):
        inside = [n for n in [*adapted, *full] if n.startswith(outer + ".")] + [
            n for n in adapted if n == outer
        ]
        if inside:
            raise ValueError(
                f"modules_to_save module {outer!r} holds {inside[0]!r}, which is adapted or trained in full "
                "as well; a module is either adapted or trained in full, once"
            )


def check_adapter_state_dict(
    plan: AdapterPlan, tensors: Mapping[str, torch.Tensor], prefix: str = ""
) -> None:
    """Raise ``ValueError`` unless ``tensors`` fit ``plan``: every key one the adapter holds, with its shape,
    and no generator, scale or ``boft_only`` bias missing. Messages name the key (after ``prefix``)."""
    shapes = plan.shapes()
    for key, tensor in tensors.items():
        need = shapes.get(key)
        if need is None:
            raise ValueError(_unexpected_key(plan, key, prefix))
        if tuple(tensor.shape) != need:
            raise ValueError(f"{prefix}{key} has shape {tuple(tensor.shape)}, the model needs {need}")
    missing = [prefix + key for key in plan.required() if key not in tensors]
    if missing:
        raise ValueError(f"targets {missing[:3]} have no weights in the adapter")


def _unexpected_key(plan: AdapterPlan, key: str, prefix: str) -> str:
    path = key.rpartition(".")[0]
    if path in plan.other_layers:
        return (
            f"{prefix}{key} belongs to {path!r}, a layer another adapter holds and this one does not target"
        )
    if key.endswith(".bias") and path in plan.targets and plan.config.bias == "none":
        return f"{prefix}{key} is a trained bias, but the adapter's config has bias='none'"
    return f"the model has no target module for {prefix + key!r}"


def add_boft(model: nn.Module, config: BOFTConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter ``adapter_name`` to ``model`` in place and make only its parameters trainable.

    Every target is checked first (:func:`plan_adapter`: type, sizes, butterfly rules): on any error,
    the model is left exactly as it was. The new adapter joins the active set.
    """
    _check_new_name(model, adapter_name)
    return apply_adapter_plan(model, plan_adapter(model, config, adapter_name))


def _check_new_name(model: nn.Module, adapter_name: str) -> None:
    if adapter_name in adapter_configs(model):
        raise ValueError(f"Adapter {adapter_name!r} already exists; delete it first or pick another name")


def apply_adapter_plan(model: nn.Module, plan: AdapterPlan) -> nn.Module:
    """Create the adapter ``plan`` describes (made by :func:`plan_adapter` for this very ``model``, which
    has not changed since). Only its parameters are trainable afterwards; it joins the active set."""
    name, config = plan.adapter_name, plan.config
    _check_new_name(model, name)
    modules = dict(model.named_modules())
    for path, target in plan.targets.items():
        module = modules[path]
        layer = module if isinstance(module, BOFTLayer) else wrap_layer(module, config, path)
        layer.add_adapter(name, config, path, layout=target.layout)
        if layer is not module:
            model.set_submodule(path, layer)
    for path in plan.saved:
        module = modules[path]
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        wrapper.add_adapter(name)
        if wrapper is not module:
            model.set_submodule(path, wrapper)
    if config.bias == "all":
        _snapshot_own_biases(model)
    configs = dict(adapter_configs(model))
    configs[name] = config
    object.__setattr__(model, _CONFIGS_ATTR, configs)
    mark_trainable(model, name)
    return model


def _find_modules_to_save(model: nn.Module, config: BOFTConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    found = [
        name
        for name, _ in model.named_modules()
        if name
        and ".original" not in name
        and ".copies." not in name
        and ".base_layer" not in name
        and _matches(name, config.modules_to_save)
    ]
    if not found:
        raise ValueError(
            f"modules_to_save {config.modules_to_save!r} matched no module of {type(model).__name__}"
        )
    return found


def _own_biases(model: nn.Module) -> dict[str, nn.Parameter]:
    """Biases of modules no BOFT layer or ``modules_to_save`` wrapper holds, by state-dict key."""
    return _unwrapped_biases(model, [*boft_layers(model), *_saved_modules(model)])


def _unwrapped_biases(model: nn.Module, wrapped_paths: list[str]) -> dict[str, nn.Parameter]:
    """Biases of ``model`` outside the modules ``wrapped_paths``, by state-dict key."""
    wrapped = tuple(f"{n}." for n in wrapped_paths)
    return {
        n: p
        for n, p in model.named_parameters()
        if n.endswith(".bias") and not (wrapped and n.startswith(wrapped))
    }


def _bias_parameters(model: nn.Module, mode: str, adapter_name: str) -> dict[str, nn.Parameter]:
    """The biases adapter ``adapter_name`` trains, by state-dict key of the stock module (``<path>.bias``).

    ``"boft_only"``: the adapter's own bias on each layer it adapts. ``"all"``: those, plus the biases
    of modules that no BOFT layer or ``modules_to_save`` wrapper holds (the modules' own parameters).
    """
    if mode == "none":
        return {}
    found = {
        f"{path}.bias": layer.boft_bias[adapter_name]
        for path, layer in boft_layers(model).items()
        if adapter_name in layer.boft_bias
    }
    if mode == "all":
        found.update(_own_biases(model))
    return found


def biases_trained_in_place(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """The un-adapted biases that bias mode ``"all"`` trains in place, each with its original value."""
    return list(getattr(model, _BIAS_SNAPSHOT_ATTR, {}).values())


def saved_modules(model: nn.Module) -> dict[str, ModulesToSave]:
    """The ``modules_to_save`` wrappers of ``model`` by module path."""
    return _saved_modules(model)


def _snapshot_own_biases(model: nn.Module) -> None:
    """Remember the original value of every un-adapted bias not remembered yet (for bias ``"all"``)."""
    snapshot = getattr(model, _BIAS_SNAPSHOT_ATTR, {})
    for param in _own_biases(model).values():
        if id(param) not in snapshot:
            snapshot[id(param)] = (param, param.detach().clone())
    object.__setattr__(model, _BIAS_SNAPSHOT_ATTR, snapshot)


@torch.no_grad()
def _restore_own_biases(model: nn.Module) -> None:
    """Put back the snapshotted un-adapted biases bit for bit (a bias a merged layer holds stays for now)."""
    snapshot = getattr(model, _BIAS_SNAPSHOT_ATTR, {})
    merged = {id(layer.base_layer.bias) for layer in boft_layers(model).values() if layer.merged}
    for key, (param, value) in list(snapshot.items()):
        if key not in merged:
            param.copy_(value)
            del snapshot[key]
    if not snapshot and hasattr(model, _BIAS_SNAPSHOT_ATTR):
        object.__delattr__(model, _BIAS_SNAPSHOT_ATTR)


def mark_trainable(model: nn.Module, adapter_names: list[str] | str) -> None:
    """Freeze everything, then unfreeze the named adapters: generators, scales, biases, copies."""
    names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    model.requires_grad_(False)
    for adapter_name in names:
        for param in _adapter_parameters(model, adapter_name).values():
            param.requires_grad_(True)


def _adapter_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """The parameters adapter ``adapter_name`` trains, keyed as :func:`adapter_state_dict` keys them."""
    config = adapter_configs(model)[adapter_name]
    params: dict[str, nn.Parameter] = {}
    for name, layer in boft_layers(model).items():
        if adapter_name in layer.boft_R:
            params[f"{name}.boft_R"] = layer.boft_R[adapter_name]
            params[f"{name}.boft_s"] = layer.boft_s[adapter_name]
    params.update(_bias_parameters(model, config.bias, adapter_name))
    for name, wrapper in _saved_modules(model).items():
        if adapter_name in wrapper.copies:
            for pname, param in wrapper.copies[adapter_name].named_parameters():
                params[f"{name}.{pname}"] = param
    return params


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Only the trained tensors of one adapter, keyed by module path: ``<path>.boft_R``, ``<path>.boft_s``,
    ``<path>.bias`` (bias modes ``all``/``boft_only``) and ``<path>.<param>`` for ``modules_to_save``.

    The tensors share storage with the parameters (detached). Inverse: :func:`load_adapter_state_dict`.
    """
    return {key: param.detach() for key, param in _adapter_parameters(model, adapter_name).items()}


@torch.no_grad()
def load_adapter_state_dict(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], adapter_name: str = "default", strict: bool = True
) -> None:
    """Copy ``tensors`` into adapter ``adapter_name``: the exact inverse of :func:`adapter_state_dict`.

    Each tensor is cast to its parameter's dtype and device. Keys and shapes are checked before anything
    is written (``ValueError`` naming the key): every key must be one the adapter holds and, with
    ``strict``, every key the adapter holds must be given.
    """
    params = _adapter_parameters(model, adapter_name)
    unexpected = sorted(k for k in tensors if k not in params)
    missing = sorted(k for k in params if k not in tensors) if strict else []
    if unexpected or missing:
        raise ValueError(
            f"Tensors do not fit adapter {adapter_name!r} of {type(model).__name__}: "
            f"unexpected keys {unexpected[:3]}, missing keys {missing[:3]}"
        )
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(params[key].shape):
            raise ValueError(
                f"{key} has shape {tuple(tensor.shape)}, the adapter needs {tuple(params[key].shape)}"
            )
    for key, tensor in tensors.items():
        params[key].copy_(tensor)


def stock_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as the stock (un-adapted) module has it, adapters not merged.

    BOFT tensors are dropped and each BOFT layer's base tensors take the stock keys; a
    ``modules_to_save`` module gives the copy in effect (the active adapter's unless disabled) or the
    original. Tensors are the module's own (shared, not copied).
    """
    layers, saved = boft_layers(model), _saved_modules(model)
    state = {}
    for key, tensor in model.state_dict().items():
        stock = _stock_key(key, layers, saved)
        if stock is not None:
            state[stock] = tensor
    return state


def stock_module_name(name: str) -> str:
    """The stock (un-adapted) module's name of a module of an adapted model: ``a.base_layer`` -> ``a``."""
    return f"{name}.".replace(".base_layer.", ".")[:-1]


def _stock_key(key: str, layers: Mapping[str, BOFTLayer], saved: Mapping[str, ModulesToSave]) -> str | None:
    """The stock module's key for a state-dict key of an adapted module (``None``: not part of it)."""
    prefix, _, _ = key.rpartition(".")
    path, _, leaf = prefix.rpartition(".")
    if leaf in ("boft_R", "boft_s", "boft_bias") and path in layers:
        return None
    for name, wrapper in saved.items():
        if not key.startswith(name + "."):
            continue
        rest = key[len(name) + 1 :]
        active = wrapper.active if not wrapper.disabled and wrapper.active in wrapper.copies else None
        keep = "original." if active is None else f"copies.{active}."
        return f"{name}.{rest[len(keep) :]}" if rest.startswith(keep) else None
    return key.replace(".base_layer.", ".")


def set_active_adapters(model: nn.Module, names: list[str] | str, weights: list[float] | None = None) -> None:
    """Activate ``names`` (composed in this order) with strengths ``weights`` (default 1.0 each)."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in adapter_configs(model)]
    if unknown:
        raise ValueError(f"Unknown adapter(s) {unknown}; available: {list(adapter_configs(model))}")
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"Got {len(weights)} weights for {len(names)} adapters")
    strengths = dict(zip(names, weights))
    for layer in boft_layers(model).values():
        if any(n not in names for n in layer.merged_adapters):
            raise ValueError("Unmerge adapters before changing the active set")
        layer.set_active(names, strengths)
    for wrapper in _saved_modules(model).values():
        wrapper.active = next((n for n in names if n in wrapper.copies), None)


def plan_merges(
    model: nn.Module, names: list[str] | None = None, progressbar: bool = False, requantize: bool = False
) -> list[tuple[BOFTLayer, MergePlan]]:
    """Compute and check the merge of ``names`` (default: the active adapters) in every BOFT layer.

    Nothing is written; a non-finite merged weight or bias raises ``ValueError`` naming the layer.
    Holds one merged copy of each adapted weight until :func:`apply_merges` writes them. A layer over a
    quantized base raises :class:`~boft_diffusion.quantized.QuantizedMergeError` unless ``requantize``
    (checked before any merge is computed; 4-bit bases raise even then).
    """
    plans = []
    layers = boft_layers(model)
    if not requantize:
        for name, layer in layers.items():
            if layer.quantization and layer._unmerged(layer.active_adapters if names is None else names):
                raise QuantizedMergeError(
                    f"layer {name!r} has a quantized base ({layer.quantization}): merging in place would round "
                    "the merged weights again; pass requantize=True (8-bit bases; the error it adds is reported), "
                    "or export the merged model, which is written at full precision"
                )
    for name, layer in tqdm(layers.items(), desc="Merging BOFT", disable=not progressbar):
        plan = layer.plan_merge(names, name, requantize=requantize)
        if plan is not None:
            plans.append((layer, plan))
    return plans


def apply_merges(plans: list[tuple[BOFTLayer, MergePlan]]) -> None:
    """Write merges planned (and checked) by :func:`plan_merges`; requantized layers' added error is warned."""
    for layer, plan in plans:
        layer.apply_merge(plan)
    errors = sorted(plan.error for _, plan in plans if plan.error is not None)
    if errors:
        kinds = sorted({layer.quantization for layer, plan in plans if plan.error is not None})
        warnings.warn(
            f"Merged into a quantized base: {len(errors)} layer(s) requantized ({', '.join(kinds)}); the rounding "
            f"adds a relative weight error |Q(W') - W'| / |W'| of {errors[len(errors) // 2]:.2%} (median), "
            f"{errors[-1]:.2%} (largest). Export the merged model for full precision.",
            stacklevel=3,
        )


def merge_adapters(
    model: nn.Module,
    names: list[str] | None = None,
    safe_merge: bool = False,
    progressbar: bool = False,
    requantize: bool = False,
) -> None:
    """Fold adapters (default: the active ones) into the base weights and biases of every BOFT layer.

    Every merged weight is checked for non-finite values before any layer is written, so a broken
    adapter raises and leaves the model untouched. ``safe_merge`` is accepted for PEFT compatibility;
    the check always runs. A quantized base needs ``requantize`` (see :func:`plan_merges`).
    """
    del safe_merge  # always on
    apply_merges(plan_merges(model, names, progressbar, requantize))


def unmerge_adapters(model: nn.Module) -> None:
    for layer in boft_layers(model).values():
        if layer.merged:
            layer.unmerge()


def remove_boft(model: nn.Module, keep_merged: bool = False) -> nn.Module:
    """Take every BOFT layer and ``modules_to_save`` wrapper out of ``model``.

    ``keep_merged=False`` (unload): merged adapters are unmerged first, the original module
    objects go back, and biases trained by ``bias="all"`` adapters get their original values back.
    ``keep_merged=True`` (merge_and_unload): merged weights and trained biases stay, and trained
    ``modules_to_save`` copies replace their originals.
    """
    for name, layer in boft_layers(model).items():
        if layer.merged and not keep_merged:
            layer.unmerge()
        model.set_submodule(name, layer.base_layer)
    if not keep_merged:
        _restore_own_biases(model)
    if hasattr(model, _BIAS_SNAPSHOT_ATTR):
        object.__delattr__(model, _BIAS_SNAPSHOT_ATTR)
    for name, wrapper in _saved_modules(model).items():
        keep = (
            wrapper.copies[wrapper.active]
            if keep_merged and wrapper.active in wrapper.copies
            else wrapper.original
        )
        model.set_submodule(name, keep)
    if hasattr(model, _CONFIGS_ATTR):
        object.__delattr__(model, _CONFIGS_ATTR)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter's parameters everywhere; layers left with no adapter go back to the original."""
    configs = dict(adapter_configs(model))
    if adapter_name not in configs:
        raise ValueError(f"Unknown adapter {adapter_name!r}; available: {list(configs)}")
    for name, layer in boft_layers(model).items():
        layer.delete_adapter(adapter_name)
        if not layer.boft_R:
            model.set_submodule(name, layer.base_layer)
    for name, wrapper in _saved_modules(model).items():
        if adapter_name in wrapper.copies:
            del wrapper.copies[adapter_name]
        if not wrapper.copies:
            model.set_submodule(name, wrapper.original)
        elif wrapper.active == adapter_name:
            wrapper.active = next(iter(wrapper.copies))
    del configs[adapter_name]
    object.__setattr__(model, _CONFIGS_ATTR, configs)
    if not any(config.bias == "all" for config in configs.values()):
        _restore_own_biases(model)


def set_enabled(model: nn.Module, enabled: bool) -> None:
    for layer in boft_layers(model).values():
        if not enabled and layer.merged:
            layer.unmerge()
        layer.disabled = not enabled
    for wrapper in _saved_modules(model).values():
        wrapper.disabled = not enabled


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (BOFT generators are stored packed: the true count)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


class BOFTModel(nn.Module):
    """PEFT-style wrapper over a model with BOFT adapters (the seed API).

    ``BOFTModel(model, config, adapter_name)`` injects the adapter; calls pass through to the model.
    """

    def __init__(self, model: nn.Module, config: BOFTConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = add_boft(model, config, adapter_name)
        self.active_adapter = adapter_name

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    @property
    def boft_config(self) -> dict[str, BOFTConfig]:
        return adapter_configs(self.model)

    def add_adapter(self, adapter_name: str, config: BOFTConfig) -> None:
        add_boft(self.model, config, adapter_name)
        self.set_adapter(self.active_adapter)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` (or a list, composed in order) active and the only trainable one."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        set_active_adapters(self.model, names)
        mark_trainable(self.model, names)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        delete_adapter(self.model, adapter_name)
        if self.active_adapter == adapter_name:
            remaining = list(adapter_configs(self.model))
            self.active_adapter = remaining[0] if remaining else None

    def merge_adapter(self, adapter_names: list[str] | None = None, requantize: bool = False) -> None:
        merge_adapters(self.model, adapter_names, requantize=requantize)

    def unmerge_adapter(self) -> None:
        unmerge_adapters(self.model)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        requantize: bool = False,
    ) -> nn.Module:
        """Merge (default: the active adapters), then remove the BOFT layers; returns the base model.

        A non-finite merged weight raises before anything is written (``safe_merge`` or not). A quantized
        base is refused unless ``requantize`` (8-bit: each merged layer is quantized again and the error
        that adds is warned; 4-bit: refused, export the merged model instead).
        """
        merge_adapters(
            self.model, adapter_names, safe_merge=safe_merge, progressbar=progressbar, requantize=requantize
        )
        return remove_boft(self.model, keep_merged=True)

    def unload(self) -> nn.Module:
        """Remove the BOFT layers without merging: the original modules, bit for bit."""
        return remove_boft(self.model, keep_merged=False)

    @contextmanager
    def disable_adapter(self):
        """Run the base model inside the ``with`` block (merged adapters are unmerged first)."""
        set_enabled(self.model, False)
        try:
            yield
        finally:
            set_enabled(self.model, True)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return count_parameters(self.model)

    def print_trainable_parameters(self) -> None:
        trainable, total = count_parameters(self.model)
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )
