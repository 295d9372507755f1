"""`ets pair` under its old name (ets.report.pairing): rows of results files paired on common problems."""

import sys

from ets.report.pairing import main

if __name__ == "__main__":
    sys.exit(main())
