"""``python -m hello`` runs the Hello publisher, as the original ``python publisher.py``."""

import sys

from hello.publisher import main

sys.exit(main())
