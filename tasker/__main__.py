"""``python -m crq.tasker`` is ``vovtasker``."""

import sys

from crq.tasker.cli import main

sys.exit(main())
