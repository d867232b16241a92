"""``python -m tasker`` is ``vovtasker``."""

import sys

from tasker.cli import main

sys.exit(main())
