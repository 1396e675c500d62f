"""``python -m boft_diffusion.benchmark --worker METHOD ...``: one benchmark worker (the runner starts them)."""

import sys

from .runner import main

sys.exit(main())
