"""``python -m twell``: the same as the ``twell`` command."""

import sys

from .cli import main

sys.exit(main())
