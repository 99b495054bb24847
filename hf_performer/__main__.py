"""``python -m hf_performer convert|report ...``: the ``hf-performer`` command."""

import sys

from .conversion.cli import main

sys.exit(main())
