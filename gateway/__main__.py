"""``python -m gateway`` is ``payroll-gateway``."""

import sys

from .cli import main

sys.exit(main())
