"""`python -m emolib`: the command line of `emolib.pipeline.cli`."""

import sys

from emolib.pipeline.cli import main

sys.exit(main())
