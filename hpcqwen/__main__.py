"""`python -m hpcqwen ...` is the `hpcqwen` console script."""

import sys

from hpcqwen.cli import main

if __name__ == "__main__":
    sys.exit(main())
