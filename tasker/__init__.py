"""crq's tasker (``vovtasker``): runs jobs on a compute host for a queue server.

Modules: ``statedir`` (durable local state), ``runner`` (job processes), ``agent``
(register/sync protocol), ``cli`` (the command). Only the standard library and httpx,
so it starts fast and installs anywhere the jobs run.
"""

from crq import __version__

__all__ = ["__version__"]
