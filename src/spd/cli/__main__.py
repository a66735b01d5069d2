"""`python -m spd.cli ...` (what torchrun and the tests launch) is the `spd` command."""

import sys

from spd.cli.main import main

if __name__ == "__main__":  # not when a spawned worker process imports this module as its parent's main
    sys.exit(main())
