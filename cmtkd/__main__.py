"""``python -m cmtkd ...`` is the ``cmtkd`` command."""
import sys

from cmtkd.cli import main

sys.exit(main())
