"""``python -m qdq.cli``: the ``qdq`` command."""

import sys

from qdq.cli.commands import main

sys.exit(main())
