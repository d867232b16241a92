import sys

if sys.argv[1:2] == ["cleanup"]:  # ncmgr cleanup --standalone / --reset-lock (no server runs)
    from crq.server.cleanup_cli import main as cleanup

    sys.exit(cleanup(sys.argv[2:]))

from crq.server.main import main

sys.exit(main())
