"""``python -m worldmodel``: the same CLI as the ``worldmodel`` console script."""

import sys

from worldmodel.cli import main

sys.exit(main())
