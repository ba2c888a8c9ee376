"""``python -m moescope …`` is the ``moescope`` command (what ``torchrun … -m moescope …`` starts on every rank)."""

import sys

from moescope.analysis.run.cli import main

if __name__ == "__main__":
    sys.exit(main())
