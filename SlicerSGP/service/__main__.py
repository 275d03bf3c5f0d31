"""`python -m SlicerSGP.service [serve options]`: the engine server, as `sgp serve` runs it."""

import sys

from SlicerSGP.cli.serve import main

sys.exit(main())
