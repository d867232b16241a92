"""crq's tasker (``vovtasker``): runs jobs on a compute host for a queue server.

Modules: ``statedir`` (durable local state), ``runner`` (job processes), ``agent``
(register/sync protocol), ``cli`` (the command). Only the standard library and httpx,
so it starts fast and installs anywhere the jobs run.
"""

__version__ = "0.1.0"
