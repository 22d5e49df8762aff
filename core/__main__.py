"""`python -m core ...` is `privedge-core ...` (core/cli.py)."""

import sys

from core.cli import main

sys.exit(main())
