"""One door for trained state besides BOFT's tensors: a registry of kinds.

A recipe may train more than rotations: the light control encoder (:mod:`boft_diffusion.control`), a
ControlNet rebuilt from the UNet, new token embeddings (pivotal tuning). Each is a :class:`TrainedState`
registered here with :func:`register_trained_state`. The adapter file, loading, checkpoints and exact
resume, FSDP gathering, unloading and the merged export ask :func:`trained_states` and never name a kind,
so a recipe that trains something new registers it and touches none of them.

A kind says:

- ``name``: its tensors lie in the adapter file under ``state.<name>.<key>``
  (:attr:`~boft_diffusion.io.format.AdapterFile.states`), and it owns the metadata keys it writes;
- ``components``: pipeline attributes it brings that BOFT adapts or trains in full (the light control's
  ``control_encoder``); the pipeline verbs treat them as components;
- :meth:`~TrainedState.collect`: what saving adapter ``adapter_name`` of a pipeline writes (tensors and
  metadata), or ``None``;
- :meth:`~TrainedState.prepare`: on loading, everything checked against the pipeline and everything
  needed built aside, the pipeline untouched; it returns an :class:`Attachment` whose ``attach`` and
  ``detach`` change the pipeline and undo the change;
- :meth:`~TrainedState.restore`: resuming, the saved tensors copied into state already in place;
- :meth:`~TrainedState.remove`: unloading or deleting an adapter, the state taken off again;
- :meth:`~TrainedState.stock_files` / :meth:`~TrainedState.load_stock_files`: the state in a stock tool's
  own format next to a converted LoRA (``boft-diffusion convert``), and loaded back by that tool.

Loading runs every kind's ``prepare`` before it attaches anything, then attaches in registration order
and detaches in reverse if anything fails, so a file that does not fit leaves the pipeline as it was.
A file never chooses a kind's code: a ``state.<name>`` that no registered kind reads is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "STATE_PREFIX",
    "Attachment",
    "SavedState",
    "TrainedState",
    "get_trained_state",
    "register_trained_state",
    "state_components",
    "trained_states",
]

STATE_PREFIX = "state"
"""Adapter-file tensors of trained state are stored as ``state.<kind name>.<key>``."""


@dataclass
class SavedState:
    """What saving writes for one kind: its own ``tensors`` (under ``state.<name>.``) and ``metadata`` keys."""

    tensors: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def _nothing(*_: Any) -> None:
    return None


@dataclass
class Attachment:
    """One kind's state for a pipeline, checked and built but not attached yet.

    ``components``: modules the BOFT plan needs besides the pipeline's own (a rebuilt ControlNet);
    ``check(plans)``: a last check once the BOFT plans exist (``{component: AdapterPlan}``);
    ``attach()`` / ``detach()``: put the state on the pipeline, and take it off exactly.
    """

    attach: Callable[[], None] = _nothing
    detach: Callable[[], None] = _nothing
    components: dict[str, Any] = field(default_factory=dict)
    check: Callable[[Mapping[str, Any]], None] = _nothing


class TrainedState:
    """A kind of trained state an adapter carries besides BOFT tensors; subclass and register one instance.

    Every method has a default that does nothing, so a kind implements what it has: the light control
    encoder (trained as a BOFT ``modules_to_save``) only rebuilds its module on loading; token embeddings
    save, load, restore and remove their own tensors.
    """

    name: str = ""
    """The registry key and the file's ``state.<name>.`` prefix: a lower-case identifier."""
    components: tuple[str, ...] = ()
    """Pipeline attributes this kind brings, which the BOFT verbs treat as components."""

    def carried_by(self, adapter: Any) -> bool:
        """Whether ``adapter`` (an :class:`~boft_diffusion.io.format.AdapterFile`) holds this kind's state."""
        return self.name in adapter.states

    def collect(self, pipe: Any, adapter_name: str, configs: Mapping[str, Any]) -> SavedState | None:
        """What a save of adapter ``adapter_name`` writes for this kind; ``configs`` are the adapter's BOFT
        configs by component. ``pipe`` may be a pipeline or a ``{component: module}`` mapping."""
        return None

    def prepare(
        self, pipe: Any, adapter: Any, adapter_name: str, options: Mapping[str, Any]
    ) -> Attachment | None:
        """Check ``adapter``'s state against ``pipe`` and build what it needs, changing nothing on ``pipe``;
        it will be the state of adapter ``adapter_name`` (the name it loads under). ``options``: the
        loader's keyword arguments (``controlnet``). Raise ``AdapterFormatError`` or ``ValueError`` naming
        ``adapter.source``; ``None``: nothing to attach."""
        return None

    def restore(self, components: Mapping[str, Any], adapter: Any, adapter_name: str) -> None:
        """Copy ``adapter``'s saved state into the state already on ``components`` (exact resume)."""

    def remove(self, pipe: Any, adapter_name: str | None = None) -> None:
        """Take this kind's state of ``adapter_name`` (``None``: of every adapter) off ``pipe``."""

    def stock_files(self, adapter: Any) -> dict[str, dict[str, Any]]:
        """Files in a stock tool's format that carry this state next to a converted LoRA: ``{file-name suffix:
        tensors}`` (token embeddings: ``"_emb"`` -> diffusers' textual-inversion tensors)."""
        return {}

    def load_stock_files(self, pipe: Any, adapter: Any, files: Mapping[str, Any]) -> None:
        """Load what :meth:`stock_files` wrote for ``adapter`` (``{suffix: path}``) onto ``pipe`` with the
        stock tool's own loader."""


_REGISTRY: dict[str, TrainedState] = {}


def register_trained_state(kind: TrainedState) -> TrainedState:
    """Register ``kind`` (one instance per name; registering the same instance again is a no-op)."""
    if not kind.name.isidentifier() or kind.name != kind.name.lower():
        raise ValueError(f"a trained-state name is a lower-case identifier, got {kind.name!r}")
    present = _REGISTRY.get(kind.name)
    if present is not None and present is not kind:
        raise ValueError(f"a trained-state kind named {kind.name!r} is already registered ({present!r})")
    _REGISTRY[kind.name] = kind
    return kind


def trained_states() -> tuple[TrainedState, ...]:
    """Every registered kind, in registration order."""
    return tuple(_REGISTRY.values())


def get_trained_state(name: str) -> TrainedState:
    """The kind called ``name``; ``KeyError`` naming the registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"no trained-state kind {name!r} is registered (registered: {', '.join(_REGISTRY) or 'none'})"
        ) from None


def state_components() -> tuple[str, ...]:
    """The pipeline attributes every registered kind brings, in registration order."""
    return tuple(c for kind in _REGISTRY.values() for c in kind.components)
