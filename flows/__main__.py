"""`python -m flows ...` is `python -m flows.pipeline ...`."""

import sys

from flows.pipeline import main

sys.exit(main())
