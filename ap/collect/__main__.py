"""``python -m ap.collect``: see ``ap.collect``."""

import sys

from .cli import main

sys.exit(main())
