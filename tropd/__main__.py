"""``python -m tropd ...`` is the ``tropd`` command (also under ``accelerate launch ... -m tropd``)."""

import sys

from tropd.cli import main

sys.exit(main())
