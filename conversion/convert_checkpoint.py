#!/usr/bin/env python
"""Convert a Hugging Face checkpoint to Performer FAVOR+ attention: the same as ``hf-performer convert``.

    python conversion/convert_checkpoint.py SOURCE OUT [--nb-features 256 --kernel favor++ --calibration-data texts.txt]

A thin script over ``hf_performer.conversion.convert`` (``--help`` lists every option).
"""

import sys

from hf_performer.conversion.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
