#!/usr/bin/env python
"""Fidelity report of a converted checkpoint against its source: the same as ``hf-performer report``.

    python conversion/report_checkpoint.py SOURCE OUT --data heldout.txt

A thin script over ``hf_performer.conversion.report`` (``--help`` lists every option).
"""

import sys

from hf_performer.conversion.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
