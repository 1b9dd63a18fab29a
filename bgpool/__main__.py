"""`python -m bgpool`: the same as the `bgpool` command."""

import sys

from .cli import main

sys.exit(main())
