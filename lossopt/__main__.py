"""``python -m lossopt``: the ``lossopt`` command."""

import sys

from lossopt.cli import main

sys.exit(main())
