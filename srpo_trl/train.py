"""Old name of :mod:`srpo_trl.recipe_runner` (kept so that ``srpo_trl.train`` imports keep working)."""

import sys

from . import recipe_runner


sys.modules[__name__] = recipe_runner
