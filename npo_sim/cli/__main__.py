"""``python -m npo_sim.cli`` is ``npo-sim``."""

import sys

from . import main

sys.exit(main())
