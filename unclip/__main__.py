"""python -m unclip: the same as the `unclip` console script."""

import sys

from unclip.cli import main

sys.exit(main())
