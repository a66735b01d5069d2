"""`python -m spd.cli ...` (what torchrun and the tests launch) is the `spd` command."""

import sys

from spd.cli.main import main

sys.exit(main())
