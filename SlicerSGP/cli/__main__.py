"""``python -m SlicerSGP.cli ...`` (e.g. under torchrun) runs the ``sgp`` command."""

import sys

from SlicerSGP.cli import main

sys.exit(main())
