"""``python -m srpo_trl.cli COMMAND ...`` (the same as ``srpo-trl COMMAND ...``)."""

import sys

from . import main


sys.exit(main())
