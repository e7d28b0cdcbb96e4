"""``python -m delivery_executor``: the same as the ``delivery-executor`` command."""

import sys

from .cli import main

sys.exit(main())
