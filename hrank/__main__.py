"""``python -m hrank`` is the same as the ``hrank`` command."""

import sys

from hrank.cli import main

sys.exit(main())
