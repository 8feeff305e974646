"""``python -m megalora ...`` (what torchrun runs): see ``megalora.cli``."""

import sys

from megalora.cli import main

sys.exit(main())
