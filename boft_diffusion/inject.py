"""Injection: find target modules by name, swap BOFT layers in, and take them out again.

Works on any ``nn.Module`` (diffusers ``UNet2DConditionModel`` / ``ControlNetModel``, transformers
``CLIPTextModel`` / ``CLIPTextModelWithProjection``, plain modules). Layers are addressed by their
qualified module name (as in ``unet.attn_processors`` keys), which stays the same after injection;
the attention modules and their processors (SDPA, xformers, custom) are never touched.

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
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import BOFTConfig
from .layers import BOFTLayer, MergePlan, wrap_layer

__all__ = [
    "TEXT_ENCODER_TARGETS",
    "UNET_ATTENTION_TARGETS",
    "UNET_ATTENTION_TARGETS_WITH_ADDED_KV",
    "BOFTModel",
    "ModulesToSave",
    "adapter_configs",
    "adapter_state_dict",
    "add_boft",
    "apply_merges",
    "boft_layers",
    "check_merge_finite",
    "default_targets",
    "find_target_names",
    "merge_adapters",
    "plan_merges",
    "remove_boft",
    "set_active_adapters",
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


def add_boft(model: nn.Module, config: BOFTConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter ``adapter_name`` to ``model`` in place and make only its parameters trainable.

    Every target is checked first (type, sizes, butterfly rules): on any error, the model is
    left exactly as it was. The new adapter joins the active set.
    """
    if adapter_name in adapter_configs(model):
        raise ValueError(f"Adapter {adapter_name!r} already exists; delete it first or pick another name")
    names = find_target_names(model, config)
    modules = dict(model.named_modules())
    planned = {}
    for name in names:
        module = modules[name]
        layer = module if isinstance(module, BOFTLayer) else wrap_layer(module, config)
        config.resolve_blocks(layer.rotation_dim, name)  # raises with the layer's name
        planned[name] = layer
    for name, layer in planned.items():
        layer.add_adapter(adapter_name, config, name)
        if layer is not modules[name]:
            model.set_submodule(name, layer)
    for name in _find_modules_to_save(model, config):
        wrapper = modules[name] if isinstance(modules[name], ModulesToSave) else ModulesToSave(modules[name])
        wrapper.add_adapter(adapter_name)
        model.set_submodule(name, wrapper)
    if config.bias == "all":
        _snapshot_own_biases(model)
    configs = dict(adapter_configs(model))
    configs[adapter_name] = config
    object.__setattr__(model, _CONFIGS_ATTR, configs)
    mark_trainable(model, adapter_name)
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
        and _matches(name, config.modules_to_save)
    ]
    if not found:
        raise ValueError(
            f"modules_to_save {config.modules_to_save!r} matched no module of {type(model).__name__}"
        )
    return found


def _own_biases(model: nn.Module) -> dict[str, nn.Parameter]:
    """Biases of modules no BOFT layer or ``modules_to_save`` wrapper holds, by state-dict key."""
    wrapped = tuple(f"{n}." for n in [*boft_layers(model), *_saved_modules(model)])
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
        for layer in boft_layers(model).values():
            if adapter_name in layer.boft_R:
                layer.boft_R[adapter_name].requires_grad_(True)
                layer.boft_s[adapter_name].requires_grad_(True)
        for bias in _bias_parameters(model, adapter_configs(model)[adapter_name].bias, adapter_name).values():
            bias.requires_grad_(True)
        for wrapper in _saved_modules(model).values():
            if adapter_name in wrapper.copies:
                wrapper.copies[adapter_name].requires_grad_(True)


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Only the trained tensors of one adapter, keyed by module path: ``<path>.boft_R``, ``<path>.boft_s``,
    ``<path>.bias`` (bias modes ``all``/``boft_only``) and ``<path>.<param>`` for ``modules_to_save``."""
    config = adapter_configs(model)[adapter_name]
    state: dict[str, torch.Tensor] = {}
    for name, layer in boft_layers(model).items():
        if adapter_name in layer.boft_R:
            state[f"{name}.boft_R"] = layer.boft_R[adapter_name].detach()
            state[f"{name}.boft_s"] = layer.boft_s[adapter_name].detach()
    for key, param in _bias_parameters(model, config.bias, adapter_name).items():
        state[key] = param.detach()
    for name, wrapper in _saved_modules(model).items():
        if adapter_name in wrapper.copies:
            for pname, param in wrapper.copies[adapter_name].named_parameters():
                state[f"{name}.{pname}"] = param.detach()
    return state


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
    model: nn.Module, names: list[str] | None = None, progressbar: bool = False
) -> list[tuple[BOFTLayer, MergePlan]]:
    """Compute and check the merge of ``names`` (default: the active adapters) in every BOFT layer.

    Nothing is written; a non-finite merged weight or bias raises ``ValueError`` naming the layer.
    Holds one merged copy of each adapted weight until :func:`apply_merges` writes them.
    """
    plans = []
    layers = boft_layers(model)
    for name, layer in tqdm(layers.items(), desc="Merging BOFT", disable=not progressbar):
        plan = layer.plan_merge(names, name)
        if plan is not None:
            plans.append((layer, plan))
    return plans


def apply_merges(plans: list[tuple[BOFTLayer, MergePlan]]) -> None:
    """Write merges planned (and checked) by :func:`plan_merges`."""
    for layer, plan in plans:
        layer.apply_merge(plan)


def check_merge_finite(model: nn.Module, names: list[str] | None = None) -> None:
    """Raise (naming layer and adapters) if merging ``names`` would write a non-finite weight."""
    plan_merges(model, names)


def merge_adapters(
    model: nn.Module, names: list[str] | None = None, safe_merge: bool = False, progressbar: bool = False
) -> None:
    """Fold adapters (default: the active ones) into the base weights and biases of every BOFT layer.

    Every merged weight is checked for non-finite values before any layer is written, so a broken
    adapter raises and leaves the model untouched. ``safe_merge`` is accepted for PEFT compatibility;
    the check always runs.
    """
    del safe_merge  # always on
    apply_merges(plan_merges(model, names, progressbar))


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

    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        merge_adapters(self.model, adapter_names)

    def unmerge_adapter(self) -> None:
        unmerge_adapters(self.model)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge (default: the active adapters), then remove the BOFT layers; returns the base model.

        A non-finite merged weight raises before anything is written (``safe_merge`` or not).
        """
        merge_adapters(self.model, adapter_names, safe_merge=safe_merge, progressbar=progressbar)
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
