"""``python -m lpips_fast``: the ``lpips-fast`` command line."""

import sys

from .cli import main

sys.exit(main())
