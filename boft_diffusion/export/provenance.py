"""What an export holds: base model, adapters with their strengths, the tool that wrote it.

The same record goes into the safetensors metadata of every merged file (``safetensors_metadata``:
string values, a few flat keys plus the full JSON) and, for folders, into ``boft_provenance.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..inject import boft_layers
from ..pipeline import pipeline_components

__all__ = ["PROVENANCE_NAME", "provenance", "provenance_json", "safetensors_metadata"]

PROVENANCE_NAME = "boft_provenance.json"


def _active_adapters(pipe: Any) -> list[dict[str, Any]]:
    """``[{"name", "strength", "components"}]`` of the adapters in effect (active or already merged)."""
    found: dict[str, dict[str, Any]] = {}
    for comp, module in pipeline_components(pipe).items():
        for layer in boft_layers(module).values():
            if layer.disabled:
                continue
            for name in dict.fromkeys([*layer.merged_adapters, *layer.active_adapters]):
                entry = found.setdefault(
                    name, {"name": name, "strength": layer.strength[name], "components": []}
                )
                if comp not in entry["components"]:
                    entry["components"].append(comp)
    return list(found.values())


def provenance(pipe: Any, base_model: str | None = None, **extra: Any) -> dict[str, Any]:
    """What the export holds: base model, adapters with strengths, the tool that wrote it."""
    from ..version import __version__

    base = (
        base_model
        or getattr(pipe, "name_or_path", None)
        or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    )
    return {
        "base_model": str(base) if base else None,
        "adapters": _active_adapters(pipe),
        "merged_by": f"boft_diffusion {__version__}",
        **extra,
    }


def safetensors_metadata(prov: Mapping[str, Any]) -> dict[str, str]:
    """Safetensors metadata (string values): a few flat keys plus the full JSON."""
    adapters = prov.get("adapters", [])
    return {
        "boft_diffusion.provenance": json.dumps(prov, sort_keys=True),
        "boft_diffusion.base_model": str(prov.get("base_model")),
        "boft_diffusion.adapters": ",".join(f"{a['name']}:{a['strength']:g}" for a in adapters),
    }


def provenance_json(prov: Mapping[str, Any]) -> str:
    """The text of ``boft_provenance.json``."""
    return json.dumps(prov, indent=2, sort_keys=True) + "\n"
