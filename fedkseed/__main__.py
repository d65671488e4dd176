"""``python -m fedkseed`` runs the ``fedkseed`` command."""

import sys

from .cli import main

sys.exit(main())
