import sys

from crq.server.main import main

sys.exit(main())
