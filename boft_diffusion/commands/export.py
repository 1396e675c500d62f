"""``boft-diffusion export``: the same as ``merge`` (a merged checkpoint from a base and adapters).

Kept as its own verb because users look for "export"; it shares ``merge``'s arguments and code, and so
its refusals: a broken adapter (NaN or inf values) is one ``error:`` line, exit code 2, nothing written.
"""

from __future__ import annotations

from .merge import COMMAND

__all__ = ["COMMAND"]
