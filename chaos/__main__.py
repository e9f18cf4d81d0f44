"""``python -m chaos [--quick]``: run the fault scenarios and print the scoreboard."""

import sys

from chaos.scoreboard import main

sys.exit(main())
