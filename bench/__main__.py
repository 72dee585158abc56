"""``python -m ternbench.bench`` is the ``ternbench`` command."""

import sys

from .cli import main

sys.exit(main())
