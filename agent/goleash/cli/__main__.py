# PYTHON_ARGCOMPLETE_OK
"""`python -m goleash.cli`: the same command as `goleash`."""

import sys

from goleash.cli.parser import main

sys.exit(main())
