"""Entry point of ProcessWriter's helper: ``python -m delivery_executor.writers._helper``.

A module of its own, which the package does not import, so that ``-m`` runs
it fresh.
"""

import sys

from .process import child_main

sync = sys.argv[sys.argv.index("--sync") + 1] if "--sync" in sys.argv else "auto"
sys.exit(child_main(sync, size_in_names="--plain-names" not in sys.argv))  # type: ignore[arg-type]
