"""`python -m kold` is the `kold` command."""

import sys

from kold.cli import main

sys.exit(main())
