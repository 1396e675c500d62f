"""Sharded training: what changes when accelerate's FSDP2 splits the trained model across processes.

Under ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` (``fsdp_version: 2``), accelerate
applies torch's ``fully_shard`` to the prepared model in place: every parameter of the denoiser, frozen
base weights and BOFT tensors alike, becomes a ``DTensor`` holding one process's shard. The module tree,
its names and the pipeline's reference to it stay as they were, so the adapter verbs still find their
layers; only reading and writing parameter *values* changes:

- saving (the final adapter, checkpoints) gathers each adapter tensor (``DTensor.full_tensor``, a
  collective: every process calls, in the same order), and the main process writes the full tensors,
  in the same files as an unsharded run (:func:`full_adapter`, :func:`full_state`);
- resuming scatters the saved full tensors back to each parameter's layout (:func:`shard_like`);
- sampling (validation, the recipe's measurement) runs on every process in lockstep, because each
  forward pass gathers the parameters of one block at a time from all processes
  (:func:`samples_on_every_process`); the main process alone writes what it sampled;
- the non-finite guards check each process's shard and agree across processes (:func:`on_any_process`).

Unsharded runs (one process, DDP) go through the same functions, which then do nothing but copy to the CPU.

What is refused, before anything is written (:func:`check_sharding`): FSDP version 1 (it flattens the
parameters of each unit into one, so the BOFT tensors have no names or shapes of their own to save),
DeepSpeed (its engine owns the optimiser state in its own partitioned format, which the pickle-free
checkpoints cannot write or resume), and more than one trained model under FSDP (accelerate's FSDP2
``prepare`` shards only one model; a second trained model would train without its gradients reduced).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..io import AdapterFile, get_boft_adapter
from .args import ConfigError

__all__ = [
    "check_sharding",
    "full_adapter",
    "full_state",
    "full_tensor",
    "is_sharded",
    "local_tensor",
    "on_any_process",
    "samples_on_every_process",
    "shard_like",
    "shard_optimizer_state",
]

FSDP_CONFIG = "configs/accelerate/fsdp.yaml"


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the trained model's parameters are split across processes (accelerate's FSDP)."""
    return accelerator.distributed_type == DistributedType.FSDP


def samples_on_every_process(accelerator: Accelerator) -> bool:
    """Whether sampling must run on every process (sharded: each forward gathers from all of them)."""
    return is_sharded(accelerator)


def check_sharding(
    accelerator: Accelerator, components: Mapping[str, nn.Module], recipe: str, unsupported: str | None = None
) -> None:
    """Refuse a distributed setup the recipes cannot save or resume correctly (see the module docstring).

    ``components``: the models the run trains (by name); ``recipe``: the recipe's name, for the message;
    ``unsupported``: why this recipe cannot run sharded at all (``None``: it can).
    """
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP and unsupported:
        raise ConfigError(f"The {recipe} recipe cannot run under FSDP: {unsupported}")
    if kind == DistributedType.DEEPSPEED:
        raise ConfigError(
            "DeepSpeed is not supported by the training recipes: its engine keeps the optimiser state "
            "partitioned in its own format, which the recipes' pickle-free checkpoints cannot save or "
            f"resume. Launch with FSDP2 instead ({FSDP_CONFIG}) or plain data parallelism"
        )
    if kind != DistributedType.FSDP:
        return
    version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise ConfigError(
            f"FSDP version {version} is not supported: it flattens each unit's parameters into one, so the "
            "BOFT tensors cannot be saved or resumed by name. Set fsdp_config.fsdp_version: 2 in the "
            f"accelerate config (as {FSDP_CONFIG} does)"
        )
    if len(components) != 1:
        raise ConfigError(
            f"Under FSDP the {recipe} recipe trains one model, and this run trains {len(components)} "
            f"({', '.join(components)}): accelerate shards one model per prepare, so the others would "
            "train without their gradients reduced. Turn off the extra ones (e.g. "
            "boft.train_text_encoder=false, control.train_unet=false) or launch without FSDP"
        )


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded ``DTensor`` gathered from every process (collective), else itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor`` (a ``DTensor``'s shard, else the tensor); no communication."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A full ``value`` laid out as ``like``: scattered to ``like``'s mesh and placements when ``like`` is
    a ``DTensor`` (collective), else unchanged."""
    if isinstance(like, DTensor) and not isinstance(value, DTensor):
        value = value.to(device=like.device, dtype=like.dtype)
        return distribute_tensor(value, like.device_mesh, like.placements)
    return value


def full_adapter(components: Mapping[str, nn.Module], adapter_name: str) -> AdapterFile:
    """Adapter ``adapter_name`` of ``components`` with every tensor whole and on the CPU (a copy).

    Collective when sharded: every process must call this, and each gets the full tensors.
    """
    adapter = get_boft_adapter(dict(components), adapter_name)

    def whole(groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        return {
            group: {key: full_tensor(value).detach().cpu().clone() for key, value in tensors.items()}
            for group, tensors in groups.items()
        }

    adapter.tensors, adapter.states = whole(adapter.tensors), whole(adapter.states)  # trained state too
    return adapter


def full_state(node: Any) -> Any:
    """``node`` (e.g. an optimiser state dict) with every ``DTensor`` gathered whole (collective when any
    is sharded: every process calls, and nested containers are walked in the same order everywhere)."""
    if isinstance(node, DTensor):
        return node.full_tensor()
    if isinstance(node, Mapping):
        return {key: full_state(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(full_state(value) for value in node)
    return node


def shard_optimizer_state(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved (full) optimiser state dict laid out like ``optimizer``'s parameters: each per-parameter
    tensor shaped as its parameter is scattered to the parameter's shards (:func:`shard_like`); scalars
    such as Adam's ``step`` are left as they are. Unsharded parameters leave it unchanged."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in saved.get("state", {}).items():
        param = params[int(index)] if int(index) < len(params) else None
        state[index] = {
            key: shard_like(value, param)
            if param is not None and isinstance(value, torch.Tensor) and value.shape == param.shape
            else value
            for key, value in entry.items()
        }
    return {**saved, "state": state}


def on_any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether ``flag`` holds on any process (one all-reduce when sharded; else ``flag``): lets a check
    that looks at local shards stop every process together."""
    if not is_sharded(accelerator) or accelerator.num_processes == 1:
        return flag
    value = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item())
