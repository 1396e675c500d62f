"""The known import-time warnings of optional libraries are dropped (boft_diffusion.quiet); nothing else is."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from boft_diffusion.quiet import IMPORT_NOISE


def test_only_the_known_messages_of_the_named_loggers_are_dropped(caplog):
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
        logging.getLogger("torchao").warning("a real problem")
        logging.getLogger("somebody.else").warning("Failed to load something")
    assert [r.getMessage() for r in caplog.records] == ["a real problem", "Failed to load something"]


def test_importing_the_package_with_every_extra_installed_prints_none_of_them():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", "import boft_diffusion"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    openings = [o for group in IMPORT_NOISE.values() for o in group] + ["Failed to load"]
    noise = [line for line in done.stderr.splitlines() if any(o in line for o in openings)]
    assert noise == [], noise
