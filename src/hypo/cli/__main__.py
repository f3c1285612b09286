"""`python -m hypo.cli ...`: the `hypo` command."""

import sys

from hypo.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
