"""`python -m stepjit ARGS` runs the `stepjit` command."""

import sys

from .cli import main

sys.exit(main())
