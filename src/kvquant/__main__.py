"""``python3 -m kvquant``: the same as the ``kvquant`` command."""

import sys

from .cli import main

sys.exit(main())
