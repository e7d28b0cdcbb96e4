"""The SMTP/LMTP load benchmark: the same code as ``delivery-executor bench``.

.venv/bin/python -m benches.smtp_load --duration 10 --json out.json
"""

import sys

from delivery_executor.bench import main

if __name__ == "__main__":
    sys.exit(main())
