"""``python -m fastguide``: the fastguide command line (see fastguide.apps.cli)."""

import sys

from .apps.cli import main

sys.exit(main())
