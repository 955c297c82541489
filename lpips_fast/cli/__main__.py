"""``python -m lpips_fast.cli``: the ``lpips-fast`` command line (as ``python -m lpips_fast``)."""

import sys

from . import main

sys.exit(main())
