"""`python -m bgpool`: the same as the `bgpool` command."""

import sys

from .cli.main import main

sys.exit(main())
