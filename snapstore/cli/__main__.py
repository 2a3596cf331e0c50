"""``python -m snapstore.cli``: the ``snapstore`` command without its console script."""

import sys

from snapstore.cli import main

if __name__ == "__main__":
    sys.exit(main())
