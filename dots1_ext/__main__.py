"""`python -m dots1_ext`: see dots1_ext.cli."""

import sys

from dots1_ext.cli import main

sys.exit(main())
