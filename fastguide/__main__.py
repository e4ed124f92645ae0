"""``python -m fastguide``: the self-check of the three ops (until the sampler CLI lands)."""

import sys

from .selfcheck import main

sys.exit(main())
