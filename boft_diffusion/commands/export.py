"""``boft-diffusion export``: an alias of ``merge`` (a merged checkpoint from a base and adapters).

Kept as its own verb because users look for "export"; it is ``merge``'s command under another name and
help line (the same arguments, code and so refusals: a broken adapter holding NaN or inf values is one
``error:`` line, exit code 2, nothing written).
"""

from __future__ import annotations

from dataclasses import replace

from .merge import COMMAND as MERGE

__all__ = ["COMMAND"]

HELP = "alias of merge: the same arguments and output (adapters merged into a base pipeline)"
COMMAND = replace(MERGE, help=HELP)
