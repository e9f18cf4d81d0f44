"""``python -m orders`` runs the Hello publisher, as the original ``python publisher.py``."""

import sys

from orders.hello import main

sys.exit(main())
